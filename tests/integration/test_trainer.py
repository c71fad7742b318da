"""The trainer as pods run it: `python -m kubetune_trainer train`, real training on CPU.

Tiny Llama (built locally) on the bundled chat data; a few seconds of training per run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CHAT = ROOT / "examples" / "data" / "support-chat"


def config(tmp: Path, **over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "task": "causal-lm",
        "model": {"source": "builtin:tiny-llama", "maxSeqLength": 128},
        "data": {
            "train": str(CHAT / "train.jsonl"),
            "validation": str(CHAT / "validation.jsonl"),
            "test": str(CHAT / "test.jsonl"),
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
        "checkpointing": {"everySteps": 10, "keepLast": 2},
        "evaluation": {"everySteps": 15, "bleuSamples": 4, "maxNewTokens": 8},
        "job": {"name": "t", "namespace": "test"},
        "output": {"uri": str(tmp / "store")},
        "telemetry": {
            "metricsPort": 0,
            "progressIntervalSeconds": 0.2,
            "terminationLog": str(tmp / "termination-log"),
        },
    }
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(
    tmp: Path, cfg: dict[str, Any], *, nproc: int = 1, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    path = tmp / "config.json"
    path.write_text(json.dumps(cfg))
    cmd = [sys.executable, "-m", "kubetune_trainer", "train", "--config", str(path)]
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            # Not 0: torchrun then hands its workers MASTER_PORT=0 with
            # TORCHELASTIC_USE_AGENT_STORE=True, and they wait for that store forever.
            str(free_port()),
            "-m",
            "kubetune_trainer",
            "train",
            "--config",
            str(path),
        ]
    full_env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    return subprocess.Popen(
        cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp
    )


def finish(proc: subprocess.Popen[str], timeout: float = 600) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def progress(store: Path) -> dict[str, Any] | None:
    try:
        return json.loads((store / "progress.json").read_text())  # type: ignore[no-any-return]
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def test_full_fine_tune_lowers_loss_and_writes_a_loadable_model(tmp_path: Path) -> None:
    rc, out = finish(start(tmp_path, config(tmp_path)))
    assert rc == 0, out
    store = tmp_path / "store"
    report = json.loads((store / "eval.json").read_text())
    assert report["tuned"]["loss"] < report["base"]["loss"], report["comparison"]
    assert report["training"]["steps"] == report["training"]["totalSteps"] == 30
    assert "bleu" in report["tuned"] and "perplexity" in report["tuned"]
    assert report["data"]["fingerprint"].startswith("sha256:")
    # Only the last K checkpoints are kept, and `latest` names a complete one.
    steps = sorted(p.name for p in (store / "checkpoints").glob("step-*"))
    assert steps == ["step-20", "step-30"]
    latest = json.loads((store / "checkpoints" / "latest").read_text())
    assert (store / "checkpoints" / f"step-{latest['step']}" / "COMPLETE").exists()
    assert progress(store)["phase"] == "done"  # type: ignore[index]
    message = (tmp_path / "termination-log").read_text()
    assert message.startswith("Succeeded: {")
    from kubetune_trainer.config import FinalReport

    final = FinalReport.model_validate_json(message.removeprefix("Succeeded: "))
    assert final.gates_passed is report["gatesPassed"]
    assert final.metrics["loss"] == round(report["tuned"]["loss"], 6)
    assert "samples" not in final.metrics and "generations" not in final.metrics
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(store / "model")
    tok = AutoTokenizer.from_pretrained(store / "model")
    assert model.config.vocab_size >= len(tok)
    card = json.loads((store / "model" / "kubetune.json").read_text())
    assert card["dataFingerprint" if "dataFingerprint" in card else "data_fingerprint"]


def test_lora_keeps_an_adapter(tmp_path: Path) -> None:
    cfg = config(
        tmp_path,
        method="lora",
        lora={"r": 4, "alpha": 8, "merge": False},
        hyperparameters={"maxSteps": 12, "learningRate": 1e-2, "perDeviceBatchSize": 8},
    )
    rc, out = finish(start(tmp_path, cfg))
    assert rc == 0, out
    store = tmp_path / "store"
    assert (store / "model" / "adapter_config.json").exists()
    report = json.loads((store / "eval.json").read_text())
    assert report["tuned"]["loss"] < report["base"]["loss"]


def test_two_ranks_zero2_read_different_data(tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    cfg = config(
        tmp_path,
        deepspeed={"zeroStage": 2},
        hyperparameters={"maxSteps": 6, "perDeviceBatchSize": 4},
    )
    rc, out = finish(start(tmp_path, cfg, nproc=2, env={"KUBETUNE_TRACE_DATA": str(trace)}))
    assert rc == 0, out
    rank0 = set(json.loads((trace / "rank-0-epoch-0.json").read_text()))
    rank1 = set(json.loads((trace / "rank-1-epoch-0.json").read_text()))
    assert rank0 and rank1 and not rank0 & rank1
    report = json.loads((tmp_path / "store" / "eval.json").read_text())
    assert report["training"]["worldSize"] == 2
    complete = json.loads((tmp_path / "store" / "checkpoints" / "step-6" / "COMPLETE").read_text())
    assert any("zero_pp_rank_1" in name for name in complete["files"])


def test_sigkill_then_restart_resumes_from_the_latest_checkpoint(tmp_path: Path) -> None:
    cfg = config(
        tmp_path,
        hyperparameters={"maxSteps": 60, "epochs": 3},
        checkpointing={"everySteps": 5, "keepLast": 2},
    )
    store = tmp_path / "store"
    proc = start(tmp_path, cfg)
    wait_for(
        lambda: (p := progress(store)) and (p.get("latestCheckpoint") or {}).get("step", 0) >= 10,
        300,
        "a checkpoint at step >= 10",
    )
    killed_at = progress(store)["step"]  # type: ignore[index]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rc, out = finish(start(tmp_path, cfg))
    assert rc == 0, out
    report = json.loads((store / "eval.json").read_text())
    resumed = report["training"]["resumedFrom"]
    assert report["training"]["steps"] == 60
    assert resumed is not None and killed_at - resumed <= 5, (killed_at, resumed)
    assert report["training"]["resumes"] == 1
    assert progress(store)["restartsSeen"] == 1  # type: ignore[index]


def test_sigterm_saves_a_checkpoint_and_exits_interrupted(tmp_path: Path) -> None:
    cfg = config(
        tmp_path,
        hyperparameters={"maxSteps": 400, "epochs": 20},
        checkpointing={"everySteps": 1000},
    )
    store = tmp_path / "store"
    proc = start(tmp_path, cfg)
    wait_for(lambda: (p := progress(store)) and p.get("step", 0) >= 3, 300, "step 3")
    proc.send_signal(signal.SIGTERM)
    rc, out = finish(proc, 120)
    assert rc == 143, out
    assert (tmp_path / "termination-log").read_text().startswith("Interrupted:")
    latest = json.loads((store / "checkpoints" / "latest").read_text())
    assert latest["step"] >= 3


def test_bad_data_fails_with_invalid_data(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    good = json.dumps({"messages": turns})
    bad.write_text(good + '\n{"messages": [\n')
    cfg = config(tmp_path, data={"train": str(bad), "validation": None, "test": None})
    rc, out = finish(start(tmp_path, cfg))
    assert rc == 3, out
    message = (tmp_path / "termination-log").read_text()
    assert message.startswith("InvalidData:") and "bad.jsonl" in message and "line 2" in message


def test_qlora_on_cpu_is_a_clear_spec_error(tmp_path: Path) -> None:
    rc, out = finish(start(tmp_path, config(tmp_path, method="qlora")))
    assert rc == 2, out
    assert "qlora" in (tmp_path / "termination-log").read_text()


def test_outputs_to_s3(tmp_path: Path, s3_bucket: str, moto_server: str) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=moto_server)
    s3.upload_file(str(CHAT / "train.jsonl"), s3_bucket, "data/train.jsonl")
    cfg = config(
        tmp_path,
        data={
            "train": f"s3://{s3_bucket}/data/train.jsonl",
            "validation": None,
            "test": None,
            "validationSplit": 0.1,
            "testSplit": 0.1,
        },
        hyperparameters={"maxSteps": 6},
        checkpointing={"everySteps": 3},
        output={"uri": f"s3://{s3_bucket}/runs/test/t", "s3Endpoint": moto_server},
    )
    rc, out = finish(start(tmp_path, cfg, env={"AWS_ENDPOINT_URL": moto_server}))
    assert rc == 0, out
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="runs/")["Contents"]}
    assert "runs/test/t/eval.json" in keys
    assert "runs/test/t/model/model.safetensors" in keys
    assert "runs/test/t/checkpoints/step-6/COMPLETE" in keys


def test_s3_outage_mid_run_is_ridden_out(tmp_path: Path, s3_bucket: str, moto_server: str) -> None:
    """The store goes away for 20 s mid-run: training goes on, the checkpoint upload retries,
    and the run ends normally with no restart and nothing lost."""
    import boto3

    from tests.tcpproxy import TcpProxy

    host, port = moto_server.removeprefix("http://").split(":")
    s3 = boto3.client("s3", endpoint_url=moto_server)
    cfg = config(
        tmp_path,
        hyperparameters={"maxSteps": 60, "epochs": 3},
        checkpointing={"everySteps": 5, "keepLast": 2},
    )
    with TcpProxy(host, int(port)) as proxy:
        cfg["output"] = {"uri": f"s3://{s3_bucket}/runs/t", "s3Endpoint": proxy.url}
        proc = start(tmp_path, cfg, env={"AWS_ENDPOINT_URL": proxy.url})

        def remote_progress() -> dict[str, Any] | None:
            try:
                body = s3.get_object(Bucket=s3_bucket, Key="runs/t/progress.json")["Body"]
                return json.loads(body.read())  # type: ignore[no-any-return]
            except Exception:
                return None

        wait_for(
            lambda: (p := remote_progress()) and (p.get("latestCheckpoint") or {}).get("step"),
            300,
            "a first checkpoint in S3",
        )
        proxy.block()
        time.sleep(20)
        assert proc.poll() is None, "the trainer gave up during a 20 s outage"
        proxy.unblock()
        rc, out = finish(proc)
    assert rc == 0, out
    assert "retrying in" in out, out[-3000:]
    report = json.loads(s3.get_object(Bucket=s3_bucket, Key="runs/t/eval.json")["Body"].read())
    assert report["training"]["steps"] == 60
    assert report["training"]["resumes"] == 0
    latest = json.loads(
        s3.get_object(Bucket=s3_bucket, Key="runs/t/checkpoints/latest")["Body"].read()
    )
    assert latest["step"] == 60
