"""Reliability fixtures: a canary S3 Secret whose value must never appear anywhere else.

Every job these tests run reads S3 through ``canary_s3``: the Secret holds a unique, known
access key and secret key (moto accepts any). When the test ends, before its namespace goes,
``canary_s3`` scans every listable object in the cluster (all API groups, all namespaces,
Secrets excepted), every pod log and termination file the node agent wrote, the operator log,
and every object in the bucket, for the canary in plain and base64 form.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.controlplane import ControlPlane
from tests.e2e.conftest import CHAT, SECRET, Operator, crd, operator  # noqa: F401
from tests.reliability.record import record

CANARY_KEY_ID = "AKIAKUBETUNECANARY01"


def canary_secret() -> str:
    # Unique per run, so an old log can never be mistaken for a new leak (or hide one).
    return f"kubetune-canary-{secrets.token_hex(12)}"


def _needles(values: list[str]) -> list[bytes]:
    out: list[bytes] = []
    for v in values:
        raw = v.encode()
        out += [raw, base64.b64encode(raw), base64.b64encode(raw).rstrip(b"=")]
    return out


def _list_paths(cp: ControlPlane) -> list[str]:
    """Every listable resource in every API group (the core group plus /apis), bar Secrets."""
    groups = ["/api/v1"]
    for group in cp.get_json("/apis")["groups"]:
        groups.append(f"/apis/{group['preferredVersion']['groupVersion']}")
    paths = []
    for gv in groups:
        status, body = cp.request("GET", gv)
        if status != 200:
            continue
        for res in body.get("resources", []):
            if "/" in res["name"] or "list" not in res.get("verbs", []):
                continue  # subresources
            if res["name"] == "secrets":
                continue  # the one place the canary belongs
            paths.append(f"{gv}/{res['name']}")
    return paths


def scan_for_canary(
    cp: ControlPlane, needles: list[bytes], files: list[Path], s3: Any, bucket: str | None
) -> tuple[int, list[str]]:
    """(places scanned, places where a needle was found)."""
    import json

    places, leaks = 0, []
    for path in _list_paths(cp):
        status, body = cp.request("GET", path)
        if status != 200:
            continue
        for item in body.get("items", []):
            places += 1
            blob = json.dumps(item).encode()
            if any(n in blob for n in needles):
                meta = item.get("metadata", {})
                leaks.append(f"{path} {meta.get('namespace', '')}/{meta.get('name', '')}")
    for f in files:
        places += 1
        try:
            data = f.read_bytes()
        except OSError:
            continue
        if any(n in data for n in needles):
            leaks.append(str(f))
    if s3 is not None and bucket:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                places += 1
                data = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
                if any(n in data for n in needles):
                    leaks.append(f"s3://{bucket}/{obj['Key']}")
    return places, leaks


@pytest.fixture
def canary_s3(
    moto_server: str,
    s3_bucket: str,
    control_plane: ControlPlane,
    namespace: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[dict[str, str]]:
    """Like the e2e ``s3`` fixture (chat data under data/, Secret ``s3-creds``), but the
    Secret holds canary keys, and the test fails if the canary shows up anywhere else."""
    import boto3

    client = boto3.session.Session().client("s3", endpoint_url=moto_server, region_name="us-east-1")
    for split in ("train", "validation", "test"):
        client.upload_file(str(CHAT / f"{split}.jsonl"), s3_bucket, f"data/{split}.jsonl")
    secret_value = canary_secret()
    control_plane.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": SECRET},
            "stringData": {
                "AWS_ACCESS_KEY_ID": CANARY_KEY_ID,
                "AWS_SECRET_ACCESS_KEY": secret_value,
            },
        },
        namespace,
    )
    yield {"bucket": s3_bucket, "endpoint": moto_server, "canary": secret_value}
    # The access key id is not a secret (it shows in S3 request logs by design); the key is.
    files = [p for p in (control_plane.dir / "pods").rglob("*") if p.is_file()]
    files += [p for p in tmp_path.rglob("*") if p.is_file()]
    places, leaks = scan_for_canary(
        control_plane, _needles([secret_value]), files, client, s3_bucket
    )
    record(request.node.nodeid, secret_places_scanned=places, secret_leaks=len(leaks))
    assert not leaks, f"the canary secret leaked into: {leaks}"
