"""Corrupt data files end a FineTuneJob with a clear, permanent ``InvalidData``.

Each bad file goes to the moto bucket, and a FineTuneJob that trains on it goes through the real
operator, control plane and node agent. Every job must end Failed with
``status.lastFailure.reason == "InvalidData"`` (exit code 3), a message that names the file and
the line, row or field, and no gang restart (retrying cannot fix the data). All jobs start at
once and are awaited together. A second test runs ``python -m kubetune_trainer train`` directly
on some of the same files and checks the exit code and the termination log.

The 10^6 duplicated rows case used to hang: dedup leaves one row, each rank then had no full
batch, and the training loop went round empty epochs forever. It now fails in seconds.
"""

from __future__ import annotations

import csv
import io
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.controlplane import ControlPlane
from tests.e2e.conftest import Operator, chat_job, get_job
from tests.integration.test_trainer import config, finish, start
from tests.reliability.record import record

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
CHAT = ROOT / "examples" / "data" / "support-chat"
INTENTS = ROOT / "examples" / "data" / "support-intents"
WAIT_TIMEOUT = 480
DUPLICATES = 1_000_000


def _chat_lines(n: int) -> list[str]:
    return (CHAT / "train.jsonl").read_text().splitlines()[:n]


def _intent_rows(n: int) -> list[dict[str, Any]]:
    lines = (INTENTS / "train.jsonl").read_text().splitlines()[:n]
    return [json.loads(line) for line in lines]


def _truncated() -> bytes:
    # Five good rows, then the writer died mid-row (no closing brackets, no newline).
    good = "\n".join(_chat_lines(5)) + "\n"
    return (good + '{"messages": [{"role": "user", "content": "my laptop won').encode()


def _garbage() -> bytes:
    return random.Random(8).randbytes(64 * 1024)


def _invalid_utf8() -> bytes:
    good = "\n".join(_chat_lines(3)) + "\n"
    bad = b'{"messages": [{"role": "user", "content": "caf\xc3\x28"}, '
    bad += b'{"role": "assistant", "content": "ok"}]}\n'
    return good.encode() + bad


def _duplicates() -> bytes:
    row = _chat_lines(1)[0]
    return ((row + "\n") * DUPLICATES).encode()


def _not_an_object() -> bytes:
    return ("\n".join(_chat_lines(2)) + '\n["user", "hello", "assistant", "hi"]\n').encode()


def _bad_role() -> bytes:
    row = {
        "messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "?"}]
    }
    return ("\n".join(_chat_lines(3)) + "\n" + json.dumps(row) + "\n").encode()


def _one_class() -> bytes:
    rows = [{"text": r["text"], "label": "billing"} for r in _intent_rows(60)]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _csv_missing_column() -> bytes:
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["text", "intent"])  # the job expects the default field name 'label'
    for r in _intent_rows(20):
        w.writerow([r["text"], r["label"]])
    return out.getvalue().encode()


def _csv_header_only() -> bytes:
    return b"text,label\n"


def _parquet(table: Any) -> bytes:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _parquet_wrong_type() -> bytes:
    import pyarrow as pa

    rows = _intent_rows(20)
    # 'text' holds numbers instead of strings.
    return _parquet(pa.table({"text": list(range(len(rows))), "label": [r["label"] for r in rows]}))


def _parquet_truncated() -> bytes:
    import pyarrow as pa

    rows = _intent_rows(200)
    data = _parquet(
        pa.table({"text": [r["text"] for r in rows], "label": [r["label"] for r in rows]})
    )
    return data[: len(data) // 2]


@dataclass(frozen=True)
class Case:
    name: str  # also the job name
    key: str  # object key in the bucket (its file name shows in the message)
    make: Callable[[], bytes]
    task: str  # "chat" (tiny-llama causal-lm) or "cls" (minilm sequence-classification)
    expect: tuple[str, ...]  # substrings the failure message must hold, besides the key

    @property
    def file(self) -> str:
        return self.key.rsplit("/", 1)[-1]


CASES = [
    Case("truncated", "bad/truncated.jsonl", _truncated, "chat", ("line 6", "invalid JSON")),
    Case("garbage", "bad/garbage.jsonl", _garbage, "chat", ("line 1", "invalid UTF-8")),
    Case("bad-utf8", "bad/bad-utf8.jsonl", _invalid_utf8, "chat", ("line 4", "invalid UTF-8")),
    Case("empty", "bad/empty.jsonl", lambda: b"", "chat", ("no rows",)),
    Case(
        "duplicates",
        "bad/duplicates.jsonl",
        _duplicates,
        "chat",
        ("too few training rows", f"{DUPLICATES - 1} duplicate", "perDeviceBatchSize"),
    ),
    Case("not-object", "bad/not-object.jsonl", _not_an_object, "chat", ("line 3", "JSON object")),
    Case(
        "bad-role",
        "bad/bad-role.jsonl",
        _bad_role,
        "chat",
        ("line 4", "'messages[0].role'", "robot"),
    ),
    Case("one-class", "bad/one-class.jsonl", _one_class, "cls", ("one-class", "field 'label'")),
    Case(
        "csv-no-label",
        "bad/csv-no-label.csv",
        _csv_missing_column,
        "cls",
        ("line 1", "field 'label'", "no column 'label'"),
    ),
    Case("csv-header-only", "bad/csv-header-only.csv", _csv_header_only, "cls", ("no rows",)),
    Case(
        "parquet-type",
        "bad/parquet-type.parquet",
        _parquet_wrong_type,
        "cls",
        ("row 1", "field 'text'", "expected a string"),
    ),
    Case("parquet-cut", "bad/parquet-cut.parquet", _parquet_truncated, "cls", ("Parquet",)),
    Case("missing-object", "bad/missing.jsonl", lambda: b"", "chat", ("no such object",)),
]
NOT_UPLOADED = {"missing-object"}


def job_for(case: Case, s3: dict[str, str]) -> dict[str, Any]:
    uri = f"s3://{s3['bucket']}/{case.key}"
    if case.task == "chat":
        return chat_job(case.name, s3, data={"train": uri})
    job = chat_job(
        case.name,
        s3,
        task="sequence-classification",
        model={"source": "builtin:minilm", "maxSeqLength": 64},
        data={"train": uri, "format": "classification"},
        evaluation={"everySteps": 30},
    )
    spec = job["spec"]
    del spec["data"]["validation"], spec["data"]["test"]  # split off train instead
    return job


def check_message(case: Case, message: str) -> list[str]:
    """What the message lacks (empty when it is clear)."""
    return [s for s in (case.file, *case.expect) if s not in message]


def _rank_pods(cp: ControlPlane, ns: str, name: str) -> list[dict[str, Any]]:
    return cp.pods(ns, f"kubetune.io/job={name},kubetune.io/role=rank")


def test_corrupt_data_fails_the_job_with_invalid_data(
    control_plane: ControlPlane,
    namespace: str,
    operator: Operator,
    canary_s3: dict[str, str],
    request: pytest.FixtureRequest,
) -> None:
    import boto3

    cp, ns = control_plane, namespace
    client = boto3.session.Session().client(
        "s3", endpoint_url=canary_s3["endpoint"], region_name="us-east-1"
    )
    for case in CASES:
        if case.name not in NOT_UPLOADED:
            client.put_object(Bucket=canary_s3["bucket"], Key=case.key, Body=case.make())
    started: dict[str, float] = {}
    for case in CASES:
        cp.apply(job_for(case, canary_s3), ns)
        started[case.name] = time.monotonic()

    # Wait for every job together; note when each one reached a terminal phase.
    ended: dict[str, float] = {}
    final: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + WAIT_TIMEOUT
    while len(final) < len(CASES) and time.monotonic() < deadline:
        if operator.proc is not None and operator.proc.poll() is not None:
            raise AssertionError(f"operator exited:\n{operator.log()[-3000:]}")
        for case in CASES:
            if case.name in final:
                continue
            job = get_job(cp, ns, case.name)
            if (job.get("status") or {}).get("phase") in ("Failed", "Succeeded"):
                final[case.name], ended[case.name] = job, time.monotonic()
        time.sleep(1.0)

    clear, problems = 0, {}
    for case in CASES:
        job = final.get(case.name) or get_job(cp, ns, case.name)
        status = job.get("status") or {}
        failure = status.get("lastFailure") or {}
        pods = _rank_pods(cp, ns, case.name)
        restarts = sum(
            cs.get("restartCount", 0)
            for p in pods
            for cs in (p.get("status") or {}).get("containerStatuses") or []
        )
        issues: list[str] = []
        if status.get("phase") != "Failed":
            issues.append(f"phase {status.get('phase')!r}, expected Failed")
        if failure.get("reason") != "InvalidData":
            issues.append(f"lastFailure.reason {failure.get('reason')!r}, expected InvalidData")
        if failure.get("exitCode") != 3:
            issues.append(f"lastFailure.exitCode {failure.get('exitCode')!r}, expected 3")
        missing = check_message(case, failure.get("message", ""))
        if missing:
            issues.append(f"message {failure.get('message', '')!r} lacks {missing}")
        if status.get("restarts", 0) != 0 or restarts != 0 or len(pods) > 1:
            issues.append(
                f"restarted: status.restarts={status.get('restarts')}, container restarts "
                f"{restarts}, rank pods {[p['metadata']['name'] for p in pods]}"
            )
        took = ended.get(case.name, time.monotonic()) - started[case.name]
        print(f"{case.name:16s} {took:6.1f}s  {failure.get('message', status.get('phase'))}")
        if issues:
            problems[case.name] = issues
        else:
            clear += 1
    n = len(CASES)
    print(f"rejected with a clear InvalidData: {clear}/{n}")
    record(
        request.node.nodeid,
        inputs_tried=n,
        inputs_rejected=clear,
        inputs_unhandled=n - clear,
        jobs_run=n,
    )
    assert not problems, json.dumps(problems, indent=1)


LOCAL_CASES = ["duplicates", "garbage", "one-class"]


def test_trainer_cli_exits_3_with_an_invalid_data_termination_log(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The trainer itself, as a pod runs it: exit code 3 and ``InvalidData: <where>: <what>``
    in the termination log. The three run concurrently; the duplicates case must not take long."""
    procs = {}
    for case in (c for c in CASES if c.name in LOCAL_CASES):
        tmp = tmp_path / case.name
        tmp.mkdir()
        path = tmp / case.file
        path.write_bytes(case.make())
        data: dict[str, Any] = {"train": str(path), "validation": None, "test": None}
        if case.task == "chat":
            cfg = config(tmp, data=data)
        else:
            cfg = config(
                tmp,
                task="sequence-classification",
                model={"source": "builtin:minilm", "maxSeqLength": 64},
                data={**data, "format": "classification"},
            )
        procs[case.name] = (case, tmp, time.monotonic(), start(tmp, cfg))
    clear, problems = 0, {}
    for name, (case, tmp, t0, proc) in procs.items():
        rc, out = finish(proc, 300)
        took = time.monotonic() - t0
        term = (tmp / "termination-log").read_text() if (tmp / "termination-log").exists() else ""
        print(f"{name:12s} exit {rc} in {took:5.1f}s: {term}")
        issues = []
        if rc != 3:
            issues.append(f"exit code {rc}, expected 3; output tail:\n{out[-2000:]}")
        if not term.startswith("InvalidData: "):
            issues.append(f"termination log {term!r} does not start with 'InvalidData: '")
        missing = check_message(case, term)
        if missing:
            issues.append(f"termination log lacks {missing}")
        if "Traceback" in out:
            issues.append(f"a traceback in the output:\n{out[-2000:]}")
        if name == "duplicates" and took > 120:
            issues.append(f"{DUPLICATES} duplicated rows took {took:.0f}s to reject")
        if issues:
            problems[name] = issues
        else:
            clear += 1
    record(
        request.node.nodeid,
        inputs_tried=len(procs),
        inputs_rejected=clear,
        inputs_unhandled=len(procs) - clear,
    )
    assert not problems, json.dumps(problems, indent=1)
