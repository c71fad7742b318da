"""Pytest fixtures for the test cluster (load with ``pytest_plugins = ["tests.cluster.fixtures"]``).

Why session scope: starting the control plane costs seconds, a namespace per test keeps tests
isolated.  Set ``KUBETUNE_CLUSTER_DIR`` to reuse a cluster started with
``python -m tests.cluster up --dir DIR`` (it is then left running); otherwise one is started
under pytest's tmp dir and exactly its processes are stopped at the end.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

from tests.cluster.controlplane import ControlPlane

if TYPE_CHECKING:
    from kubernetes.client import ApiClient


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """A running control plane with fake GPU nodes and the node agent."""
    existing = os.environ.get("KUBETUNE_CLUSTER_DIR")
    if existing:
        cp = ControlPlane.load(existing)
        cp.wait_apiserver_ready(30)
        yield cp
        return
    cp = ControlPlane(tmp_path_factory.mktemp("cluster"))
    cp.start()
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture
def namespace(control_plane: ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace (with its default ServiceAccount token ready) per test."""
    base = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    name = f"{base}-{secrets.token_hex(3)}"
    control_plane.create_namespace(name)
    yield name
    control_plane.delete_namespace(name)


@pytest.fixture
def kube_api(control_plane: ControlPlane) -> Iterator[ApiClient]:
    """kubernetes.client.ApiClient authenticated as cluster admin."""
    api = control_plane.api_client()
    try:
        yield api
    finally:
        close: Any = api.close  # untyped upstream
        close()
