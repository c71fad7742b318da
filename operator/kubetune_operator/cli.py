"""`kubetune`: the user CLI.

    kubetune validate FILE...          check job YAMLs with no cluster
    kubetune run FILE [--store URI]    run a job locally (CPU), results in ./runs/<job>/
    kubetune serve MODEL [...]         serve a trained model over HTTP

Heavy imports (torch, the trainer) happen inside the commands that need them, so `validate`
stays fast and works with only the operator extra installed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kubetune_operator.api.validation import SpecError, load_jobs


def cmd_validate(args: argparse.Namespace) -> int:
    failed = 0
    for name in args.files:
        try:
            jobs = load_jobs(name)
        except SpecError as err:
            failed += 1
            print(f"{name}: INVALID ({len(err.errors)} error{'s' if len(err.errors) > 1 else ''})")
            for e in err.errors:
                print(f"  - {e}")
            continue
        names = ", ".join(j.metadata.name for j in jobs)
        print(f"{name}: valid ({names})")
    return 1 if failed else 0


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


def cmd_serve(args: argparse.Namespace, extra: list[str]) -> int:
    from kubetune_trainer.serve.server import main as serve_main

    return serve_main(["--model", args.model, *extra])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubetune", description="Fine-tune language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="validate FineTuneJob YAML files (no cluster needed)")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("run", help="run a FineTuneJob locally on this machine")
    p.add_argument("file", metavar="FILE")
    p.add_argument(
        "--store",
        default=None,
        help="where results go: a directory or s3://bucket/prefix (default ./runs/<job>)",
    )
    p.add_argument("--job", default=None, help="which job, when FILE holds several")
    p.add_argument(
        "--metrics-port", type=int, default=0, help="serve Prometheus metrics here (0: off)"
    )
    p.set_defaults(func=cmd_run)

    from kubetune_operator.cli_cluster import add_cluster_commands

    add_cluster_commands(sub)

    p = sub.add_parser("serve", help="serve a trained model (OpenAI-style API)")
    p.add_argument("model", help="model directory or s3:// prefix written by the trainer")
    p.set_defaults(func=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "serve":
        return cmd_serve(args, extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
