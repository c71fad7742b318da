"""Test Kubernetes cluster: real control-plane binaries plus a node agent running pods as
local processes.  See ``controlplane.py`` (API), ``nodeagent.py`` (kubelet stand-in),
``faults.py`` (fault injection), ``fixtures.py`` (pytest) and ``build.sh`` (binaries)."""

from tests.cluster.controlplane import ClusterError, ControlPlane, wait_for

__all__ = ["ClusterError", "ControlPlane", "wait_for"]
