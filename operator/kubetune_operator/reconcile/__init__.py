"""Reconcile one FineTuneJob: a pure plan (`plan.py`) and the executor that carries it out
(`executor.py`, the only part that reads the cluster, through `kube.py`)."""
