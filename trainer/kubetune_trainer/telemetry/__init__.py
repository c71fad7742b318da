"""Trainer telemetry, three channels each readable without the others.

* `prometheus`: metrics on rank 0 (`TrainerMetrics`).
* `progress`: `progress.json` in the run's store (`ProgressReporter`).
* `termination`: the Kubernetes termination message the operator reads.

Exit codes and failure reasons live in `kubetune_trainer.errors`. Nothing here imports torch
or boto3: it must import fast and run in the operator image.
"""
