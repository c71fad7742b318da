"""`kubetune get|status|logs`: FineTuneJobs on a cluster, through the current kubeconfig.

Registered by cli/main.py through `add_cluster_commands(subparsers)`.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import Any

from kubetune_operator import kube
from kubetune_operator import status as st
from kubetune_operator.api.models import FineTuneJobStatus
from kubetune_operator.builders.common import pod_name

Obj = dict[str, Any]


def progress_bar(percent: int, width: int = 30) -> str:
    filled = max(0, min(width, round(width * percent / 100)))
    return "[" + "#" * filled + "-" * (width - filled) + f"] {percent:3d}%"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: $KUBECONFIG)")
    p.add_argument("--context", default=None, help="kubeconfig context")
    p.add_argument("-n", "--namespace", default=None, help="namespace (default: the context's)")
    p.add_argument("-o", "--output", choices=["text", "json"], default="text")


def _namespace(args: argparse.Namespace) -> str:
    if args.namespace:
        return str(args.namespace)
    try:
        from kubernetes import config

        loader: Any = config
        _, active = loader.list_kube_config_contexts(config_file=args.kubeconfig)
        return str((active or {}).get("context", {}).get("namespace") or "default")
    except Exception:
        return "default"


def _connect(args: argparse.Namespace) -> None:
    from kubernetes import config

    try:
        kube.configure(args.kubeconfig, args.context)
    except config.ConfigException as err:
        raise SystemExit(f"kubetune: no cluster configuration: {err}") from None


def _age(created: str | None) -> str:
    when = st.parse_time(created)
    if when is None:
        return "?"
    secs = int((datetime.now(UTC) - when).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{secs // size}{unit}"
    return f"{secs}s"


def cmd_get(args: argparse.Namespace) -> int:
    _connect(args)
    ns = None if args.all_namespaces else _namespace(args)
    jobs = kube.list_jobs(ns)
    if args.output == "json":
        print(json.dumps({"items": jobs}, indent=2))
        return 0
    rows = [["NAMESPACE", "NAME", "PHASE", "PROGRESS", "LOSS", "EVAL", "GPU-H", "AGE"]]
    for job in jobs:
        s = job.get("status") or {}
        prog = s.get("progress") or {}
        loss = prog.get("loss")
        gpu_hours = (s.get("usage") or {}).get("gpuHours")
        rows.append(
            [
                job["metadata"]["namespace"],
                job["metadata"]["name"],
                s.get("phase", "Pending"),
                f"{prog['percent']}%" if "percent" in prog else "",
                f"{loss:.4g}" if isinstance(loss, int | float) else "",
                s.get("evalSummary") or "",
                f"{gpu_hours:.3g}" if isinstance(gpu_hours, int | float) else "",
                _age(job["metadata"].get("creationTimestamp")),
            ]
        )
    if not args.all_namespaces:
        rows = [r[1:] for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    _connect(args)
    ns = _namespace(args)
    job = kube.get_job(ns, args.job)
    if job is None:
        print(f"kubetune: FineTuneJob {ns}/{args.job} not found", file=sys.stderr)
        return 1
    if args.output == "json":
        print(json.dumps(job.get("status") or {}, indent=2))
        return 0
    s = FineTuneJobStatus.model_validate(job.get("status") or {})
    print(f"Job:       {ns}/{args.job}")
    print(f"Phase:     {s.phase}")
    if s.progress is not None:
        p = s.progress
        eta = f", ETA {p.eta_seconds}s" if p.eta_seconds is not None else ""
        print(f"Progress:  {progress_bar(p.percent)}  step {p.step}/{p.total_steps}{eta}")
        if p.loss is not None:
            print(f"Loss:      {p.loss:.4g}")
        if p.tokens_per_second is not None:
            print(f"Tokens/s:  {p.tokens_per_second:.1f}")
    if s.eval_summary:
        print(f"Eval:      {s.eval_summary}")
    if s.restarts:
        print(f"Restarts:  {s.restarts}")
    if s.interruptions:
        print(f"Interrupted: {s.interruptions} time(s) (preemption, eviction; not failures)")
    queued = next((c for c in s.conditions if c.type == "Queued" and c.status == "True"), None)
    if queued is not None:
        print(f"Queued:    since {queued.last_transition_time}: {queued.reason}: {queued.message}")
    if s.usage is not None:
        u = s.usage
        cost = f", cost ~{u.estimated_cost:.2f} {u.currency or ''}" if u.estimated_cost else ""
        print(
            f"Usage:     {u.gpu_hours:.4g} GPU-hours ({u.gpu_seconds:.0f} GPU-s), wall "
            f"{u.wall_seconds:.0f}s, {u.attempts} attempt(s), {u.interruptions} "
            f"interruption(s){cost}".rstrip()
        )
    if s.last_failure is not None:
        f = s.last_failure
        print(
            f"Last failure: {f.pod} on {f.node or '?'}: {f.reason} (exit {f.exit_code}) {f.message}"
        )
    if s.endpoint:
        print(f"Endpoint:  {s.endpoint}")
    if s.model_uri:
        print(f"Model:     {s.model_uri}")
    if s.metrics:
        print("Metrics:")
        for key in sorted(s.metrics):
            print(f"  {key:<24} {s.metrics[key]:.6g}")
    if s.conditions:
        print("Conditions:")
        for c in s.conditions:
            print(f"  {c.type:<18} {c.status:<7} {c.reason:<22} {c.message}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    _connect(args)
    ns = _namespace(args)
    name = pod_name(args.job, args.rank)
    try:
        text = kube.pod_log(ns, name, tail=args.tail)
    except kube.ApiError as err:
        if err.status == 404:
            print(f"kubetune: pod {ns}/{name} not found", file=sys.stderr)
            return 1
        raise
    if args.output == "json":
        print(json.dumps({"pod": name, "namespace": ns, "log": text}))
    else:
        sys.stdout.write(text)
    return 0


def add_cluster_commands(sub: Any) -> None:
    """Add get/status/logs to the `kubetune` subparsers."""
    p = sub.add_parser("get", help="list FineTuneJobs (like kubectl get ftj)")
    _common(p)
    p.add_argument("-A", "--all-namespaces", action="store_true")
    p.set_defaults(func=cmd_get)

    p = sub.add_parser("status", help="phase, progress, metrics and conditions of a job")
    _common(p)
    p.add_argument("job", metavar="JOB")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("logs", help="logs of a job's rank pod")
    _common(p)
    p.add_argument("job", metavar="JOB")
    p.add_argument("--rank", type=int, default=0, help="which rank (default 0)")
    p.add_argument("--tail", type=int, default=None, help="last N lines only")
    p.set_defaults(func=cmd_logs)
