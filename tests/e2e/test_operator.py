"""FineTuneJobs through the operator on the real control plane, trainer pods and moto S3.

Each test gets its own namespace, bucket and operator; waits poll with timeouts.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import faults
from tests.cluster.controlplane import ControlPlane, wait_for
from tests.e2e.conftest import Operator, chat_job, condition, get_job, wait_phase

pytestmark = [pytest.mark.cluster]

ROOT = Path(__file__).resolve().parents[2]
TRAIN_TIMEOUT = 420


def _events(cp: ControlPlane, ns: str, name: str) -> list[dict[str, Any]]:
    items = cp.get_json(f"/api/v1/namespaces/{ns}/events")["items"]
    return [e for e in items if e["involvedObject"].get("name") == name]


def _rank_pods(cp: ControlPlane, ns: str, name: str) -> list[dict[str, Any]]:
    return cp.pods(ns, f"kubetune.io/job={name},kubetune.io/role=rank")


def _eval_json(s3: dict[str, str], ns: str, name: str) -> dict[str, Any]:
    import boto3

    client = boto3.session.Session().client(
        "s3", endpoint_url=s3["endpoint"], region_name="us-east-1"
    )
    body = client.get_object(Bucket=s3["bucket"], Key=f"runs/{ns}/{name}/eval.json")["Body"]
    return dict(json.loads(body.read()))


def _check_cli(cp: ControlPlane, ns: str, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`kubetune get/status/logs` (cli_cluster) against the same cluster."""
    import argparse

    from kubetune_operator.cli.cluster import add_cluster_commands

    parser = argparse.ArgumentParser(prog="kubetune")
    add_cluster_commands(parser.add_subparsers(dest="command", required=True))
    conn = ["--kubeconfig", str(cp.kubeconfig), "-n", ns]
    capsys.readouterr()
    for argv in (["get", *conn], ["status", name, *conn], ["logs", name, *conn, "--tail", "5"]):
        args = parser.parse_args(argv)
        assert args.func(args) == 0, argv
    out = capsys.readouterr().out
    assert name in out and "Succeeded" in out and "Evaluated" in out and "100%" in out
    args = parser.parse_args(["status", name, *conn, "-o", "json"])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["phase"] == "Succeeded"


def test_happy_path_trains_evaluates_and_serves(
    control_plane: ControlPlane,
    namespace: str,
    operator: Operator,
    s3: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    cp, ns = control_plane, namespace
    job = chat_job(
        "happy",
        s3,
        evaluation={"gates": [{"metric": "loss", "op": "<", "value": 100.0}]},
        inference={"enabled": True, "resources": {"cpu": "1", "memory": "2Gi"}},
    )
    cp.apply(job, ns)
    wait_for("rank pod", lambda: _rank_pods(cp, ns, "happy"), 60)
    pod = _rank_pods(cp, ns, "happy")[0]
    assert pod["metadata"]["name"] == "happy-rank-0"
    assert pod["metadata"]["ownerReferences"][0]["kind"] == "FineTuneJob"

    done = wait_phase(cp, operator, ns, "happy", {"Succeeded", "Failed"}, TRAIN_TIMEOUT)
    status = done["status"]
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1)
    for type_ in ("Validated", "Launched", "Trained", "Evaluated", "Serving"):
        cond = condition(done, type_)
        assert cond is not None and cond["status"] == "True", (type_, cond)
    assert "loss=" in (condition(done, "Evaluated") or {})["message"]
    assert status["evalSummary"].endswith("PASS")
    assert status["endpoint"] == f"http://happy-serve.{ns}.svc:8080"
    assert status["modelUri"] == f"s3://{s3['bucket']}/runs/{ns}/happy/model"
    assert status["progress"]["percent"] == 100
    assert "test_loss" in status["metrics"]
    assert status["restarts"] == 0

    serve = cp.pods(ns, "kubetune.io/job=happy,kubetune.io/role=serve")
    assert len(serve) == 1
    ip = serve[0]["status"]["podIP"]
    with urllib.request.urlopen(f"http://{ip}:8080/readyz", timeout=10) as resp:
        assert resp.status == 200
    req = urllib.request.Request(
        f"http://{ip}:8080/v1/chat/completions",
        data=json.dumps(
            {"messages": [{"role": "user", "content": "My laptop will not boot"}], "max_tokens": 8}
        ).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        answer = json.loads(resp.read())
    assert answer["choices"][0]["message"]["role"] == "assistant"

    _check_cli(cp, ns, "happy", capsys)

    reasons = {e["reason"] for e in _events(cp, ns, "happy")}
    assert {"Launched", "Evaluated"} <= reasons, reasons
    # No secret ever lands in the ConfigMap or the status.
    cm = cp.get_json(f"/api/v1/namespaces/{ns}/configmaps/happy-config")
    assert "testing" not in json.dumps(cm["data"]) and "testing" not in json.dumps(status)


def _s3_keys(s3: dict[str, str], prefix: str) -> list[str]:
    import boto3

    client = boto3.session.Session().client(
        "s3", endpoint_url=s3["endpoint"], region_name="us-east-1"
    )
    resp = client.list_objects_v2(Bucket=s3["bucket"], Prefix=prefix)
    return [o["Key"] for o in resp.get("Contents", [])]


def test_killed_rank_gang_restarts_and_resumes_from_checkpoint(
    control_plane: ControlPlane, namespace: str, operator: Operator, s3: dict[str, str]
) -> None:
    cp, ns = control_plane, namespace
    cp.apply(chat_job("kill", s3, hyperparameters={"epochs": 8}), ns)

    def checkpointed() -> bool:
        keys = _s3_keys(s3, f"runs/{ns}/kill/checkpoints/")
        return any(k.endswith("/COMPLETE") for k in keys)

    wait_for("a complete checkpoint", checkpointed, TRAIN_TIMEOUT)
    # No wait: the operator may tear the gang down before the kill is reported back to us.
    faults.kill_pod_process(cp, ns, "kill-rank-0", wait=False)

    done = wait_phase(cp, operator, ns, "kill", {"Succeeded", "Failed"}, TRAIN_TIMEOUT)
    status = done["status"]
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1)
    assert status["restarts"] == 1
    assert status["lastFailure"]["exitCode"] == 137
    assert status["lastFailure"]["pod"] == "kill-rank-0"
    pods = _rank_pods(cp, ns, "kill")
    assert [p["metadata"]["labels"]["kubetune.io/attempt"] for p in pods] == ["2"]
    report = _eval_json(s3, ns, "kill")
    assert report["training"]["resumedFrom"] is not None
    assert "GangRestart" in {e["reason"] for e in _events(cp, ns, "kill")}


def test_failed_gates_leave_no_deployment(
    control_plane: ControlPlane, namespace: str, operator: Operator, s3: dict[str, str]
) -> None:
    cp, ns = control_plane, namespace
    job = chat_job(
        "gates",
        s3,
        evaluation={"gates": [{"metric": "loss", "op": "<", "value": 0.001}]},
        inference={"enabled": True},
    )
    cp.apply(job, ns)
    done = wait_phase(cp, operator, ns, "gates", {"Succeeded", "Failed"}, TRAIN_TIMEOUT)
    evaluated = condition(done, "Evaluated")
    assert evaluated is not None and evaluated["status"] == "False", evaluated
    assert evaluated["reason"] == "GatesFailed"
    assert "needs < 0.001" in evaluated["message"] and "loss=" in evaluated["message"]
    assert done["status"]["phase"] == "Failed"
    assert done["status"]["evalSummary"].endswith("FAIL")
    assert "endpoint" not in done["status"]
    status, _ = cp.request("GET", f"/apis/apps/v1/namespaces/{ns}/deployments/gates-serve")
    assert status == 404


def _expect(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    return first.split("expect:", 1)[1].strip()


def test_invalid_examples_are_rejected_or_fail_with_the_field(
    control_plane: ControlPlane, namespace: str, operator: Operator
) -> None:
    cp, ns = control_plane, namespace
    applied: dict[str, str] = {}
    for path in sorted((ROOT / "examples" / "invalid").glob("*.yaml")):
        before = {j["metadata"]["name"] for j in _jobs(cp, ns)}
        proc = cp.kubectl("apply", "-n", ns, "-f", str(path), check=False)
        created = {j["metadata"]["name"] for j in _jobs(cp, ns)} - before
        if proc.returncode != 0 and not created:
            continue  # rejected at apply
        assert created, (path.name, proc.stdout, proc.stderr)
        for name in created:
            applied[name] = path.name
    assert applied, "every example was rejected at apply; nothing reached the operator"
    for name, file in applied.items():
        done = wait_phase(cp, operator, ns, name, {"Failed", "Running", "Succeeded"}, 60)
        validated = condition(done, "Validated")
        assert done["status"]["phase"] == "Failed", (file, done["status"])
        assert validated is not None and validated["status"] == "False", (file, validated)
        assert validated["reason"] == "InvalidSpec"
        expect = _expect(ROOT / "examples" / "invalid" / file)
        if "." in expect:  # a field path: the message names its last part
            field = expect.rsplit(".", 1)[1]
            if name != "good-one":
                assert field in validated["message"], (file, validated["message"])
        # kubectl keeps the inline secret in last-applied-configuration; we never repeat it.
        assert "wJalrXUtnFEMI" not in json.dumps(done["status"]), "inline secret in status"
    assert not cp.pods(ns, "app.kubernetes.io/name=kubetune")
    events = json.dumps(cp.get_json(f"/api/v1/namespaces/{ns}/events")["items"])
    assert "wJalrXUtnFEMI" not in events, "inline secret in an event"


def _jobs(cp: ControlPlane, ns: str) -> list[dict[str, Any]]:
    return list(cp.get_json(f"/apis/kubetune.io/v1alpha1/namespaces/{ns}/finetunejobs")["items"])


def test_backoff_limit_exhausted_fails_with_last_failure(
    control_plane: ControlPlane, namespace: str, operator: Operator, s3: dict[str, str]
) -> None:
    from tests.cluster.controlplane import free_port

    cp, ns = control_plane, namespace
    closed = {**s3, "endpoint": f"http://127.0.0.1:{free_port()}"}
    cp.apply(chat_job("nostore", closed, runPolicy={"backoffLimit": 1}), ns)
    done = wait_phase(cp, operator, ns, "nostore", {"Succeeded", "Failed"}, TRAIN_TIMEOUT)
    status = done["status"]
    assert status["phase"] == "Failed"
    assert status["restarts"] == 1
    assert status["lastFailure"]["exitCode"] == 5
    assert status["lastFailure"]["reason"] == "StorageUnavailable"
    failed = condition(done, "Failed")
    assert failed is not None and failed["reason"] == "BackoffLimitExceeded"


def _patch(cp: ControlPlane, ns: str, name: str, spec: dict[str, Any]) -> None:
    cp.kubectl("patch", "ftj", name, "-n", ns, "--type=merge", "-p", json.dumps({"spec": spec}))


def _rank_running(cp: ControlPlane, ns: str, name: str) -> bool:
    return any(p.get("status", {}).get("phase") == "Running" for p in _rank_pods(cp, ns, name))


def test_two_node_job_trains_to_completion(
    control_plane: ControlPlane, namespace: str, operator: Operator, s3: dict[str, str]
) -> None:
    cp, ns = control_plane, namespace
    cp.apply(chat_job("pair", s3, resources={"nodes": 2}), ns)
    done = wait_phase(cp, operator, ns, "pair", {"Succeeded", "Failed"}, TRAIN_TIMEOUT)
    assert done["status"]["phase"] == "Succeeded", json.dumps(done["status"], indent=1)
    pods = _rank_pods(cp, ns, "pair")
    assert sorted(p["metadata"]["name"] for p in pods) == ["pair-rank-0", "pair-rank-1"]
    assert _eval_json(s3, ns, "pair")["training"]["worldSize"] == 2


def test_suspend_then_resume_continues_from_checkpoint(
    control_plane: ControlPlane, namespace: str, operator: Operator, s3: dict[str, str]
) -> None:
    cp, ns = control_plane, namespace
    cp.apply(chat_job("pause", s3, hyperparameters={"epochs": 3}), ns)

    def checkpointed() -> bool:
        keys = _s3_keys(s3, f"runs/{ns}/pause/checkpoints/")
        return any(k.endswith("/COMPLETE") for k in keys)

    wait_for("a complete checkpoint", checkpointed, TRAIN_TIMEOUT)
    _patch(cp, ns, "pause", {"runPolicy": {"suspend": True}})
    wait_phase(cp, operator, ns, "pause", {"Suspended"}, 60)
    wait_for("ranks gone", lambda: not _rank_pods(cp, ns, "pause"), 120)
    _patch(cp, ns, "pause", {"runPolicy": {"suspend": False}})
    done = wait_phase(cp, operator, ns, "pause", {"Succeeded", "Failed"}, TRAIN_TIMEOUT)
    assert done["status"]["phase"] == "Succeeded", json.dumps(done["status"], indent=1)
    assert done["status"]["restarts"] == 0
    assert _eval_json(s3, ns, "pause")["training"]["resumedFrom"] is not None


def test_cancel_stops_ranks_and_ends_cancelled(
    control_plane: ControlPlane, namespace: str, operator: Operator, s3: dict[str, str]
) -> None:
    cp, ns = control_plane, namespace
    cp.apply(chat_job("stop", s3, hyperparameters={"epochs": 3}), ns)
    wait_for("rank running", lambda: _rank_running(cp, ns, "stop"), 120)
    _patch(cp, ns, "stop", {"runPolicy": {"cancel": True}})
    done = wait_phase(cp, operator, ns, "stop", {"Cancelled"}, 60)
    assert done["status"]["completionTime"]
    wait_for("ranks gone", lambda: not _rank_pods(cp, ns, "stop"), 120)


def test_deleting_a_running_job_leaves_no_pods(
    control_plane: ControlPlane, namespace: str, operator: Operator, s3: dict[str, str]
) -> None:
    cp, ns = control_plane, namespace
    cp.apply(chat_job("gone", s3, hyperparameters={"epochs": 3}), ns)
    wait_for("rank running", lambda: _rank_running(cp, ns, "gone"), 120)
    cp.kubectl("delete", "ftj", "gone", "-n", ns, "--wait=false")
    # ownerReferences: the controller-manager's garbage collector removes the children.
    wait_for("no pods", lambda: not cp.pods(ns, "kubetune.io/job=gone"), 180)
    wait_for(
        "no configmap",
        lambda: cp.request("GET", f"/api/v1/namespaces/{ns}/configmaps/gone-config")[0] == 404,
        60,
    )


def test_operator_restart_mid_run_completes_without_duplicates(
    control_plane: ControlPlane, namespace: str, operator: Operator, s3: dict[str, str]
) -> None:
    import signal

    cp, ns = control_plane, namespace
    cp.apply(chat_job("steady", s3, hyperparameters={"epochs": 2}), ns)
    wait_for("rank running", lambda: _rank_running(cp, ns, "steady"), 120)
    uid = _rank_pods(cp, ns, "steady")[0]["metadata"]["uid"]
    operator.stop(signal.SIGKILL)
    operator.start()
    done = wait_phase(cp, operator, ns, "steady", {"Succeeded", "Failed"}, TRAIN_TIMEOUT)
    assert done["status"]["phase"] == "Succeeded", json.dumps(done["status"], indent=1)
    pods = _rank_pods(cp, ns, "steady")
    assert [p["metadata"]["uid"] for p in pods] == [uid]
    assert done["status"]["restarts"] == 0


def test_spec_change_is_refused_while_running(
    control_plane: ControlPlane, namespace: str, operator: Operator, s3: dict[str, str]
) -> None:
    cp, ns = control_plane, namespace
    cp.apply(chat_job("fixed", s3, hyperparameters={"epochs": 2}), ns)
    wait_for("rank running", lambda: _rank_running(cp, ns, "fixed"), 120)
    _patch(cp, ns, "fixed", {"hyperparameters": {"learningRate": 0.5}})

    def refused() -> dict[str, Any] | None:
        return condition(get_job(cp, ns, "fixed"), "SpecChangeRefused")

    cond = wait_for("SpecChangeRefused", refused, 60)
    assert cond["status"] == "True"
    assert "spec.hyperparameters.learningRate" in cond["message"]
    done = wait_phase(cp, operator, ns, "fixed", {"Succeeded", "Failed"}, TRAIN_TIMEOUT)
    assert done["status"]["phase"] == "Succeeded"
    assert len(_rank_pods(cp, ns, "fixed")) == 1


def test_active_deadline_fails_the_job(
    control_plane: ControlPlane, namespace: str, operator: Operator, s3: dict[str, str]
) -> None:
    cp, ns = control_plane, namespace
    job = chat_job(
        "late", s3, hyperparameters={"epochs": 3}, runPolicy={"activeDeadlineSeconds": 5}
    )
    cp.apply(job, ns)
    done = wait_phase(cp, operator, ns, "late", {"Failed", "Succeeded"}, 120)
    failed = condition(done, "Failed")
    assert failed is not None and failed["reason"] == "DeadlineExceeded"
    wait_for("ranks gone", lambda: not _rank_pods(cp, ns, "late"), 120)


def test_ttl_deletes_the_finished_job(
    control_plane: ControlPlane, namespace: str, operator: Operator, s3: dict[str, str]
) -> None:
    cp, ns = control_plane, namespace
    cp.apply(chat_job("brief", s3, runPolicy={"ttlSecondsAfterFinished": 1}), ns)
    path = f"/apis/kubetune.io/v1alpha1/namespaces/{ns}/finetunejobs/brief"
    wait_for("job deleted by TTL", lambda: cp.request("GET", path)[0] == 404, TRAIN_TIMEOUT)
    wait_for("no pods", lambda: not cp.pods(ns, "kubetune.io/job=brief"), 180)
