"""`kubetune run FILE`: a FineTuneJob on this machine (CPU), results in ./runs/<job>/.

One of the two CLI modules allowed to load the trainer runtime (torch): see cli/__init__.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kubetune_operator.api.validation import SpecError, load_jobs


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
    from kubetune_operator.local import run_job_locally

    return run_job_locally(
        job,
        store=args.store,
        metrics_port=args.metrics_port,
        # Relative data paths in a job file resolve against the file's folder.
        base_dir=Path(args.file).resolve().parent,
    )
