"""Fixtures for the operator end-to-end tests: the CRD, S3 (moto) with data and a Secret,
and the operator itself as a `kopf run` subprocess (so tests can kill and restart it)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.controlplane import ControlPlane, free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds" / "kubetune.io_finetunejobs.yaml"
CHAT = ROOT / "examples" / "data" / "support-chat"
SECRET = "s3-creds"


@pytest.fixture(scope="session")
def crd(control_plane: ControlPlane) -> str:
    control_plane.kubectl("apply", "-f", str(CRD))
    control_plane.kubectl(
        "wait", "--for=condition=Established", "crd/finetunejobs.kubetune.io", "--timeout=60s"
    )
    return "finetunejobs.kubetune.io"


class Operator:
    """`kopf run -m kubetune_operator.main --namespace NS --standalone` as a child process."""

    def __init__(self, cp: ControlPlane, namespace: str, log_path: Path) -> None:
        self.cp = cp
        self.namespace = namespace
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.metrics_port = free_port()

    def start(self) -> None:
        env = dict(os.environ)
        env.update(
            KUBECONFIG=str(self.cp.kubeconfig),
            KUBETUNE_OPERATOR_METRICS_PORT=str(self.metrics_port),
            KUBETUNE_OPERATOR_METRICS_HOST="127.0.0.1",
            KUBETUNE_RESTART_BACKOFF_SECONDS="2",
            KUBETUNE_TRAINER_IMAGE="kubetune/trainer:test",
        )
        kopf = str(Path(sys.executable).parent / "kopf")
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                kopf,
                "run",
                "-m",
                "kubetune_operator.main",
                "--namespace",
                self.namespace,
                "--standalone",
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def operator(
    control_plane: ControlPlane, namespace: str, crd: str, tmp_path: Path
) -> Iterator[Operator]:
    op = Operator(control_plane, namespace, tmp_path / "operator.log")
    op.start()
    try:
        yield op
    finally:
        op.stop()
        tail = op.log()[-6000:]
        print(f"---- operator log (tail) ----\n{tail}")


@pytest.fixture
def s3(
    moto_server: str, s3_bucket: str, control_plane: ControlPlane, namespace: str
) -> dict[str, str]:
    """The bucket with the chat data under data/, and a Secret with (fake) keys."""
    import boto3

    client = boto3.session.Session().client("s3", endpoint_url=moto_server, region_name="us-east-1")
    for split in ("train", "validation", "test"):
        client.upload_file(str(CHAT / f"{split}.jsonl"), s3_bucket, f"data/{split}.jsonl")
    control_plane.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": SECRET},
            "stringData": {
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
            },
        },
        namespace,
    )
    return {"bucket": s3_bucket, "endpoint": moto_server}


def chat_job(name: str, s3: dict[str, str], **over: Any) -> dict[str, Any]:
    """A tiny-llama chat SFT job that trains in seconds on CPU."""
    bucket = s3["bucket"]
    spec: dict[str, Any] = {
        "task": "causal-lm",
        "model": {"source": "builtin:tiny-llama", "maxSeqLength": 128},
        "data": {
            "train": f"s3://{bucket}/data/train.jsonl",
            "validation": f"s3://{bucket}/data/validation.jsonl",
            "test": f"s3://{bucket}/data/test.jsonl",
            "format": "chat",
        },
        "method": "full",
        "hyperparameters": {
            "learningRate": 3e-3,
            "perDeviceBatchSize": 8,
            "epochs": 1,
            "warmupRatio": 0.0,
        },
        "deepspeed": {"zeroStage": 0},
        "checkpointing": {"everySteps": 5, "keepLast": 2},
        "evaluation": {"bleuSamples": 4, "maxNewTokens": 8, "compareBase": False},
        "resources": {"nodes": 1, "gpusPerNode": 0, "cpu": "1", "memory": "2Gi"},
        "storage": {
            "bucket": bucket,
            "prefix": "runs",
            "endpoint": s3["endpoint"],
            "credentialsSecretRef": {"name": SECRET},
        },
        "runPolicy": {"backoffLimit": 2},
    }
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": spec,
    }


def get_job(cp: ControlPlane, namespace: str, name: str) -> dict[str, Any]:
    return dict(
        cp.get_json(f"/apis/kubetune.io/v1alpha1/namespaces/{namespace}/finetunejobs/{name}")
    )


def condition(job: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for c in (job.get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return dict(c)
    return None


def wait_phase(
    cp: ControlPlane, op: Operator, namespace: str, name: str, phases: set[str], timeout: float
) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        if op.proc is not None and op.proc.poll() is not None:
            raise AssertionError(f"operator exited {op.proc.returncode}:\n{op.log()[-3000:]}")
        job = get_job(cp, namespace, name)
        phase = (job.get("status") or {}).get("phase")
        return job if phase in phases else None

    try:
        return dict(wait_for(f"{name} phase in {phases}", check, timeout))
    except Exception:
        job = get_job(cp, namespace, name)
        print(json.dumps(job.get("status"), indent=1))
        raise
