"""Operator at scale: time until N FineTuneJobs applied at once all have their rank pods, versus
the same client creating the same pods directly.

    python benchmarks/operator_scale.py [--jobs 500] [--ranks 1] [--client kubectl|http]

What runs: the test control plane (``tests/cluster``: etcd, kube-apiserver, controller-manager,
scheduler) with enough fake GPU nodes for every pod, the CRD, and the operator as a
``kopf run -m kubetune_operator.main --namespace NS --standalone`` subprocess, as the e2e tests
run it. The node agent keeps the nodes Ready but runs no pods (``run_pods=False``): the rank
pods are bound and stay Pending, so no trainer starts and the numbers measure the API work only.

Two phases, each in its own namespace, each timed from just before the client starts until a
pod watch has seen every expected rank pod (``<job>-rank-<i>``):

* direct: the client creates the rank pods itself, built by the operator's pure builders
  (``kubetune_operator.builders.pods``) from the same specs; they differ from the operator's
  pods only in the ownerReference to the job. One warm-up pod goes first; all are then
  force-deleted.
* operator: the client applies the N FineTuneJobs; the operator validates each one (the
  credentials Secret included) and creates its ConfigMap, headless Service and rank pods.
  One warm-up job first proves the operator is watching and gives its idle RSS.

The client is one ``kubectl apply -f`` of a List (default; what a user runs), or ``--client
http``: one POST per object from a thread pool. Peak RSS is the operator's VmHWM from
/proc, read after ``--settle`` seconds of steady state (its timers tick every 5 s per job).
The last line prints the ratio operator/direct of the times until all pods exist.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "operator"), str(ROOT / "trainer")]

from kubetune_operator.api.models import API_VERSION, KIND, PLURAL  # noqa: E402
from kubetune_operator.api.validation import validate_document  # noqa: E402
from kubetune_operator.builders.common import APP, APP_LABEL, ROLE_LABEL, pod_name  # noqa: E402
from kubetune_operator.builders.pods import build_rank_pods  # noqa: E402
from kubetune_operator.handlers.jobs import TIMER_INTERVAL  # noqa: E402
from tests.cluster.controlplane import ControlPlane, free_port, wait_for  # noqa: E402

Obj = dict[str, Any]
CRD = ROOT / "crds" / "kubetune.io_finetunejobs.yaml"
SECRET = "s3-creds"
IMAGE = "kubetune/trainer:bench"
RANK_SELECTOR = f"{APP_LABEL}={APP},{ROLE_LABEL}=rank"
# The fake nodes offer 110 pods each; leave room for the warm-up job.
PODS_PER_NODE = 100


# --------------------------------------------------------------------------- manifests


def job_manifest(name: str, namespace: str, ranks: int) -> Obj:
    """A small valid job: CPU only, tiny requests, so every rank pod fits on the fake nodes."""
    bucket = "kubetune-bench"
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "task": "causal-lm",
            "model": {"source": "builtin:tiny-llama", "maxSeqLength": 128},
            "data": {
                "train": f"s3://{bucket}/data/train.jsonl",
                "validation": f"s3://{bucket}/data/validation.jsonl",
                "format": "chat",
            },
            "method": "full",
            "hyperparameters": {"learningRate": 3e-3, "perDeviceBatchSize": 8, "epochs": 1},
            "resources": {"nodes": ranks, "gpusPerNode": 0, "cpu": "100m", "memory": "128Mi"},
            "storage": {
                "bucket": bucket,
                "prefix": "runs",
                "endpoint": "http://127.0.0.1:9",
                "credentialsSecretRef": {"name": SECRET},
            },
        },
    }


def direct_pods(jobs: list[Obj]) -> list[Obj]:
    """The rank pods of attempt 1, as the operator builds them (minus the ownerReference)."""
    out: list[Obj] = []
    for doc in jobs:
        job = validate_document(doc)
        out += build_rank_pods(job, 1, image=IMAGE)
    return out


def job_names(n: int) -> list[str]:
    return [f"scale-{i:04d}" for i in range(n)]


# --------------------------------------------------------------------------- clients


class Client:
    """Creates a batch of objects in one namespace: kubectl apply of a List, or parallel POSTs."""

    def __init__(self, cp: ControlPlane, kind: str, workdir: Path, concurrency: int) -> None:
        self.cp = cp
        self.kind = kind
        self.workdir = workdir
        self.concurrency = concurrency

    def create(self, namespace: str, objs: list[Obj], label: str) -> None:
        if self.kind == "kubectl":
            path = self.workdir / f"{label}.json"
            path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": objs}))
            self.cp.kubectl("apply", "-n", namespace, "-f", str(path), timeout=3600)
            return

        def post(obj: Obj) -> None:
            if obj["kind"] == "Pod":
                coll = f"/api/v1/namespaces/{namespace}/pods"
            else:
                coll = f"/apis/{API_VERSION}/namespaces/{namespace}/{PLURAL}"
            status, body = self.cp.request("POST", coll, obj)
            if status != 201:
                raise RuntimeError(f"POST {coll} {obj['metadata']['name']} -> {status}: {body}")

        with ThreadPoolExecutor(self.concurrency) as pool:
            for _ in pool.map(post, objs):
                pass


# --------------------------------------------------------------------------- pod watch


@dataclass
class PodWatch:
    """Watches rank pods in a namespace and records when each expected one first appeared."""

    cp: ControlPlane
    namespace: str
    expected: set[str]
    seen: dict[str, float] = field(default_factory=dict)
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _rv: str = ""

    def start(self) -> None:
        # List first so the watch starts from a known resourceVersion (nothing is missed).
        self._rv = self._list()
        threading.Thread(target=self._run, name="pod-watch", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _mark(self, name: str, at: float) -> None:
        if name in self.expected and name not in self.seen:
            self.seen[name] = at
            if len(self.seen) == len(self.expected):
                self.done.set()

    def _list(self) -> str:
        q = urllib.parse.urlencode({"labelSelector": RANK_SELECTOR})
        body = self.cp.get_json(f"/api/v1/namespaces/{self.namespace}/pods?{q}")
        now = time.monotonic()
        for pod in body["items"]:
            self._mark(pod["metadata"]["name"], now)
        return str(body["metadata"]["resourceVersion"])

    def _events(self) -> Iterator[Obj]:
        q = urllib.parse.urlencode(
            {
                "watch": "1",
                "labelSelector": RANK_SELECTOR,
                "resourceVersion": self._rv,
                "allowWatchBookmarks": "true",
                "timeoutSeconds": "120",
            }
        )
        req = urllib.request.Request(
            f"{self.cp.server}/api/v1/namespaces/{self.namespace}/pods?{q}"
        )
        req.add_header("Authorization", f"Bearer {self.cp.state.admin_token}")
        ctx = ssl.create_default_context(cafile=str(self.cp.pki / "ca.crt"))
        with urllib.request.urlopen(req, timeout=180, context=ctx) as resp:
            for line in resp:
                if line.strip():
                    yield json.loads(line)

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set() and not self.done.is_set():
            try:
                for ev in self._events():
                    obj = ev["object"]
                    if ev["type"] == "ERROR":  # e.g. 410 Gone: re-list below
                        raise RuntimeError(f"watch error: {obj.get('message')}")
                    self._rv = obj["metadata"]["resourceVersion"]
                    if ev["type"] == "ADDED":
                        self._mark(obj["metadata"]["name"], time.monotonic())
                    if self.done.is_set() or self._stop.is_set():
                        return
                failures = 0
            except Exception as exc:
                failures += 1
                if failures > 20:
                    self.error = exc
                    self.done.set()
                    return
                time.sleep(0.5)  # back-off before re-listing after a broken watch
                with contextlib.suppress(Exception):
                    self._rv = self._list()


# --------------------------------------------------------------------------- operator


def read_status_kib(pid: int, key: str) -> int | None:
    """A ``VmRSS``/``VmHWM`` line of /proc/<pid>/status, in KiB (None once the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else None


class Operator:
    """The operator as the e2e tests run it: a ``kopf run`` subprocess in its own session."""

    def __init__(self, cp: ControlPlane, namespace: str, log_path: Path) -> None:
        self.cp = cp
        self.namespace = namespace
        self.log_path = log_path
        self.metrics_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ)
        env.update(
            KUBECONFIG=str(self.cp.kubeconfig),
            KUBETUNE_OPERATOR_METRICS_PORT=str(self.metrics_port),
            KUBETUNE_OPERATOR_METRICS_HOST="127.0.0.1",
            KUBETUNE_TRAINER_IMAGE=IMAGE,
            PYTHONPATH=os.pathsep.join([str(ROOT / "operator"), str(ROOT / "trainer")]),
        )
        env.pop("KUBETUNE_KUBECONFIG", None)
        kopf = str(Path(sys.executable).parent / "kopf")
        argv = [kopf, "run", "-m", "kubetune_operator.main", "--namespace", self.namespace]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*argv, "--standalone"],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"operator exited with {self.proc.returncode}; log {self.log_path} ends with:\n"
                + self.log_path.read_text(errors="replace")[-3000:]
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            return str(resp.read().decode())

    def stop(self, grace: float = 20.0) -> tuple[float, bool]:
        """SIGTERM, then SIGKILL after ``grace``: (seconds until it exited, whether killed)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return 0.0, False
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            return time.monotonic() - t0, True
        return time.monotonic() - t0, False


def reconcile_counts(metrics_text: str) -> dict[str, tuple[int, float]]:
    """(count, total seconds) of reconcile passes by trigger, from the operator's /metrics."""
    out: dict[str, tuple[int, float]] = {}
    pat = re.compile(
        r'^kubetune_operator_reconcile_duration_seconds_(count|sum)\{trigger="([^"]+)"\} (\S+)$'
    )
    for line in metrics_text.splitlines():
        m = pat.match(line)
        if m:
            kind, trig, value = m.groups()
            count, total = out.get(trig, (0, 0.0))
            if kind == "count":
                count = int(float(value))
            else:
                total = float(value)
            out[trig] = (count, total)
    return out


SIGTERM_LINE = "Signal SIGTERM is received"


def log_findings(text: str, limit: int = 6) -> list[str]:
    """Counts of WARNING/ERROR lines in the operator log, grouped by a normalised message."""
    counts: Counter[str] = Counter()
    for line in text.splitlines():
        m = re.search(r"\b(WARNING|ERROR|CRITICAL)\b(.*)", line)
        if not m and "Traceback" not in line:
            continue
        msg = m.group(0) if m else line.strip()
        msg = re.sub(r"scale-\d{4}", "scale-N", msg)
        msg = re.sub(r"\d+(\.\d+)?", "#", msg)[:160]
        counts[msg] += 1
    return [f"{n:>6} x {msg}" for msg, n in counts.most_common(limit)]


# --------------------------------------------------------------------------- phases


@dataclass
class PhaseResult:
    name: str
    objects: int
    pods: int
    client_s: float
    all_pods_s: float
    last_seen: list[float]


def wait_watch(watch: PodWatch, timeout: float, alive: Callable[[], None] | None) -> None:
    deadline = time.monotonic() + timeout
    while not watch.done.wait(1.0):
        if alive is not None:
            alive()
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{len(watch.seen)}/{len(watch.expected)} rank pods after {timeout:.0f}s "
                f"in {watch.namespace}"
            )
    if watch.error is not None:
        raise RuntimeError(f"pod watch failed: {watch.error!r}")


def timed_phase(
    name: str,
    cp: ControlPlane,
    client: Client,
    namespace: str,
    objs: list[Obj],
    expected: set[str],
    timeout: float,
    alive: Callable[[], None] | None = None,
) -> PhaseResult:
    watch = PodWatch(cp, namespace, expected)
    watch.start()
    try:
        t0 = time.monotonic()
        client.create(namespace, objs, name)
        client_s = time.monotonic() - t0
        print(f"  {name}: client done in {client_s:.1f}s, waiting for pods", file=sys.stderr)
        wait_watch(watch, timeout, alive)
    finally:
        watch.stop()
    times = sorted(t - t0 for t in watch.seen.values())
    return PhaseResult(name, len(objs), len(expected), client_s, times[-1], times)


def setup_namespace(cp: ControlPlane, namespace: str) -> None:
    cp.create_namespace(namespace)
    cp.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": SECRET},
            "stringData": {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"},
        },
        namespace,
    )


def force_delete_pods(cp: ControlPlane, namespace: str) -> None:
    """Bound pods are never confirmed gone by the (non-running) agent: delete with grace 0."""
    q = urllib.parse.urlencode({"labelSelector": RANK_SELECTOR, "gracePeriodSeconds": "0"})
    status, body = cp.request("DELETE", f"/api/v1/namespaces/{namespace}/pods?{q}")
    if status != 200:
        raise RuntimeError(f"delete pods in {namespace} -> {status}: {body}")
    wait_for(
        f"rank pods in {namespace} to be gone",
        lambda: not cp.pods(namespace, RANK_SELECTOR),
        300,
        1.0,
    )


def pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


# --------------------------------------------------------------------------- main


def run(args: argparse.Namespace, workdir: Path) -> int:
    total_pods = args.jobs * args.ranks
    nodes = max(2, math.ceil((total_pods + args.ranks) / PODS_PER_NODE))
    print(f"starting the control plane with {nodes} fake nodes in {workdir}", file=sys.stderr)
    cp = ControlPlane(workdir / "cluster", nodes=nodes, gpus_per_node=8, run_pods=False)
    operator: Operator | None = None
    try:
        cp.start(timeout=300)
        cp.kubectl("apply", "-f", str(CRD))
        cp.kubectl(
            "wait", "--for=condition=Established", "crd/finetunejobs.kubetune.io", "--timeout=60s"
        )
        client = Client(cp, args.client, workdir, args.concurrency)
        names = job_names(args.jobs)
        expected = {pod_name(n, r) for n in names for r in range(args.ranks)}

        # ----- direct: the same client creates the same pods
        ns_direct = "bench-direct"
        setup_namespace(cp, ns_direct)
        # Warm-up, as for the operator below: one pod through the API server first.
        cp.apply(direct_pods([job_manifest("warmup", ns_direct, 1)])[0], ns_direct)
        pods = direct_pods([job_manifest(n, ns_direct, args.ranks) for n in names])
        print(f"direct: creating {len(pods)} rank pods", file=sys.stderr)
        direct = timed_phase("direct", cp, client, ns_direct, pods, expected, args.timeout)
        force_delete_pods(cp, ns_direct)

        # ----- operator: the same client applies the jobs
        ns_op = "bench-operator"
        setup_namespace(cp, ns_op)
        operator = Operator(cp, ns_op, workdir / "operator.log")
        operator.start()
        op = operator
        warm = job_manifest("warmup", ns_op, 1)
        cp.apply(warm, ns_op)
        wait_for(
            "the operator to create the warm-up job's rank pod",
            lambda: cp.pods(ns_op, f"kubetune.io/job=warmup,{ROLE_LABEL}=rank"),
            120,
            0.5,
            fail_fast=op.check_alive,
        )
        idle_kib = read_status_kib(op.pid, "VmRSS") or 0
        jobs = [job_manifest(n, ns_op, args.ranks) for n in names]
        print(f"operator: applying {len(jobs)} FineTuneJobs", file=sys.stderr)
        with_op = timed_phase(
            "operator", cp, client, ns_op, jobs, expected, args.timeout, op.check_alive
        )
        at_done_kib = read_status_kib(op.pid, "VmHWM") or 0
        counts_done = reconcile_counts(op.metrics())
        settle_t0 = time.monotonic()
        deadline = settle_t0 + args.settle
        while time.monotonic() < deadline:
            op.check_alive()
            time.sleep(1.0)  # steady state: the per-job timers keep reconciling
        peak_kib = read_status_kib(op.pid, "VmHWM") or 0
        counts = reconcile_counts(op.metrics())
        timer_rate = (counts.get("timer", (0, 0.0))[0] - counts_done.get("timer", (0, 0.0))[0]) / (
            time.monotonic() - settle_t0
        )
        sample = cp.pod(ns_op, pod_name(names[0], 0))
        want = direct_pods([job_manifest(names[0], ns_op, args.ranks)])[0]
        same = (
            sample["metadata"]["labels"] == want["metadata"]["labels"]
            and sample["spec"]["containers"][0]["command"]
            == want["spec"]["containers"][0]["command"]
            and sample["spec"]["containers"][0]["image"] == want["spec"]["containers"][0]["image"]
        )
        stop_s, killed = operator.stop()
        running_log, _, shutdown_log = operator.log_path.read_text(errors="replace").partition(
            SIGTERM_LINE
        )
        findings, shutdown_findings = log_findings(running_log), log_findings(shutdown_log)
    finally:
        if operator is not None:
            operator.stop()
        cp.stop()

    # ----- report
    print()
    print(f"{args.jobs} FineTuneJobs x {args.ranks} rank(s), client: {args.client}, nodes: {nodes}")
    hdr = (
        f"{'phase':<10}{'objects':>9}{'pods':>7}{'client s':>10}{'p50 pod s':>11}{'all pods s':>12}"
    )
    print(hdr)
    for r in (direct, with_op):
        print(
            f"{r.name:<10}{r.objects:>9}{r.pods:>7}{r.client_s:>10.1f}"
            f"{pct(r.last_seen, 0.5):>11.1f}{r.all_pods_s:>12.1f}"
        )
    mib = 1024.0
    print(
        f"operator RSS: idle {idle_kib / mib:.0f} MiB, peak {at_done_kib / mib:.0f} MiB when all "
        f"pods existed, peak {peak_kib / mib:.0f} MiB after {args.settle:.0f}s more"
    )
    if counts:
        parts = [
            f"{t} {c} ({s / max(c, 1) * 1e3:.0f} ms avg)" for t, (c, s) in sorted(counts.items())
        ]
        print("reconcile passes: " + ", ".join(parts))
    wanted = (args.jobs + 1) / TIMER_INTERVAL
    print(
        f"steady state: {timer_rate:.1f} timer reconciles/s over {args.settle:.0f}s "
        f"(the {args.jobs + 1} jobs' {TIMER_INTERVAL:.0f}s timers ask for {wanted:.1f}/s)"
    )
    print(f"operator pods match the builders' (labels, command, image): {same}")
    print("operator log warnings/errors while running (count x normalised message):")
    print("\n".join(findings) or "  none")
    how = "SIGKILL after the grace" if killed else "exited"
    print(f"operator shutdown: {stop_s:.1f}s after SIGTERM ({how})")
    if shutdown_findings:
        print("operator log warnings/errors after SIGTERM:")
        print("\n".join(shutdown_findings))
    print(f"ratio operator/direct: {with_op.all_pods_s / direct.all_pods_s:.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--jobs", type=int, default=500, help="FineTuneJobs to apply (default 500)")
    p.add_argument("--ranks", type=int, default=1, help="rank pods per job (default 1)")
    p.add_argument(
        "--client",
        choices=("kubectl", "http"),
        default="kubectl",
        help="kubectl: one `kubectl apply -f` of a List (default); http: parallel POSTs",
    )
    p.add_argument("--concurrency", type=int, default=16, help="threads for --client http")
    p.add_argument("--timeout", type=float, default=1800, help="seconds to wait per phase")
    p.add_argument("--settle", type=float, default=15, help="seconds to keep the operator running "
                   "after all pods exist, before reading its peak RSS (default 15)")  # fmt: skip
    p.add_argument("--keep-dir", action="store_true", help="keep logs and state (printed path)")
    args = p.parse_args(argv)
    if args.jobs < 1 or args.ranks < 1:
        p.error("--jobs and --ranks must be at least 1")

    def interrupted(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    workdir = Path(tempfile.mkdtemp(prefix="kubetune-scale-"))
    ok = False
    try:
        rc = run(args, workdir)
        ok = True
        return rc
    except KeyboardInterrupt:
        print("interrupted; the cluster and the operator were stopped", file=sys.stderr)
        return 130
    finally:
        if args.keep_dir or not ok:
            print(f"logs and state kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
