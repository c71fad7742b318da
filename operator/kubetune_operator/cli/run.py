"""`kubetune run FILE`: a FineTuneJob run here on CPU, with a progress bar and a summary.

One of the two CLI modules allowed to load the trainer runtime (torch): see cli/__init__.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from kubetune_operator.api.models import FineTuneJob
from kubetune_operator.api.validation import SpecError, load_jobs
from kubetune_operator.builders.trainer_config import trainer_config
from kubetune_trainer.config import TelemetrySpec

console = Console(stderr=True)

_CLUSTER_ONLY = ("resources", "storage", "run_policy", "inference")


def _cluster_notes(job: FineTuneJob) -> list[str]:
    notes = []
    for name in _CLUSTER_ONLY:
        value = getattr(job.spec, name)
        if value is not None and name in job.spec.model_fields_set:
            alias = job.spec.model_fields[name].alias or name
            notes.append(f"spec.{alias} applies on a cluster only; ignored here")
    return notes


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


def _summary(result: Any, out: str, eval_uri: str) -> Table:
    report = result.eval
    table = Table(title=f"kubetune run: {report['task']} on the {report['split']} split")
    table.add_column("metric")
    table.add_column("base", justify="right")
    table.add_column("fine-tuned", justify="right")
    table.add_column("change", justify="right")
    for name, row in (report.get("comparison") or {}).items():
        mark = "better" if row.get("improved") else "worse"
        table.add_row(name, _fmt(row["base"]), _fmt(row["tuned"]), f"{row['delta']:+.4f} {mark}")
    if not report.get("comparison"):
        for name, value in report["tuned"].items():
            if isinstance(value, int | float):
                table.add_row(name, "-", _fmt(value), "")
    for gate in report.get("gates", []):
        verdict = "PASS" if gate["passed"] else "FAIL"
        table.add_row(
            f"gate {gate['metric']} {gate['op']} {_fmt(gate['value'])}",
            "",
            _fmt(gate["actual"]),
            verdict,
        )
    table.add_section()
    table.add_row("model", "", out, "")
    table.add_row("eval report", "", eval_uri, "")
    for name, secs in report["timings"].items():
        table.add_row(f"time: {name}", "", f"{secs:.1f}s", "")
    table.add_row("steps", "", f"{result.steps}/{result.total_steps}", "")
    return table


def run_job_locally(
    job: FineTuneJob,
    *,
    store: str | None,
    metrics_port: int = 0,
    base_dir: Path | None = None,
) -> int:
    """Train, evaluate and save `job` on this machine. Returns the process exit code."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for note in _cluster_notes(job):
        console.print(f"[dim]note: {note}[/dim]")
    output = store or str(Path("runs") / job.metadata.name)
    cfg = trainer_config(
        job,
        output_uri=output,
        telemetry=TelemetrySpec(
            metrics_port=metrics_port, metrics_host="127.0.0.1", termination_log=""
        ),
    )
    from kubetune_trainer.errors import classify_failure
    from kubetune_trainer.train.run import run

    started = time.monotonic()
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("step {task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[tps]} tok/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    bar = progress.add_task("preparing", total=None, loss="-", tps="-")

    def on_phase(name: str) -> None:
        progress.update(bar, description=name)

    def on_step(step: int, total: int, epoch: float, loss: float, tps: float) -> None:
        progress.update(
            bar,
            completed=step,
            total=total,
            loss=f"{loss:.4f}",
            tps=f"{tps:,.0f}",
            description=f"train (epoch {epoch:.2f})",
        )

    try:
        with progress:
            result = run(cfg, base_dir=base_dir, on_step=on_step, on_phase=on_phase)
    except (Exception, KeyboardInterrupt) as exc:
        reason, message, code = classify_failure(exc)
        console.print(f"[bold red]{reason}[/bold red]: {message}")
        return code
    console.print(_summary(result, result.model_uri, f"{output}/eval.json"))
    console.print(f"finished in {time.monotonic() - started:.0f}s")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    try:
        jobs = load_jobs(args.file)
    except SpecError as err:
        print(f"{args.file} is not a valid FineTuneJob:", file=sys.stderr)
        for e in err.errors:
            print(f"  - {e}", file=sys.stderr)
        return 2
    if len(jobs) > 1 and args.job is None:
        names = ", ".join(j.metadata.name for j in jobs)
        print(f"{args.file} holds {len(jobs)} jobs ({names}); pick one with --job", file=sys.stderr)
        return 2
    job = next((j for j in jobs if args.job in (None, j.metadata.name)), None)
    if job is None:
        print(f"no job named {args.job!r} in {args.file}", file=sys.stderr)
        return 2
    return run_job_locally(
        job,
        store=args.store,
        metrics_port=args.metrics_port,
        # Relative data paths in a job file resolve against the file's folder.
        base_dir=Path(args.file).resolve().parent,
    )
