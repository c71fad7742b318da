"""A moto S3 server on loopback, shared by the whole session, and a fresh bucket per test.

Registered for the suite through `pytest_plugins` in tests/conftest.py. The server is real HTTP,
so subprocesses (the trainer CLI) can use it too: pass the endpoint URL on.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

_FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}
# Anything that could route the tests to a real account or profile.
_CLEARED = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE")


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """Endpoint URL (http://127.0.0.1:<port>) of a moto server; fake credentials in os.environ."""
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in (*_FAKE_ENV, *_CLEARED)}
    os.environ.update(_FAKE_ENV)
    for key in _CLEARED:
        os.environ.pop(key, None)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_bucket(moto_server: str) -> Iterator[str]:
    """A new, empty bucket on the moto server; emptied and removed afterwards."""
    import boto3

    client = boto3.session.Session().client("s3", endpoint_url=moto_server, region_name="us-east-1")
    name = f"kt-test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    try:
        yield name
    finally:
        # Free moto's memory: large test objects would otherwise live for the whole session.
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=name):
            keys: Any = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
        client.delete_bucket(Bucket=name)
