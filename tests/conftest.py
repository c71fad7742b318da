"""Shared fixtures: the real control plane (tests/cluster) and a moto S3 server on loopback."""

from __future__ import annotations

import os

# Nothing in the tests may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = ["tests.cluster.fixtures", "tests.s3fixtures"]
