"""`kubetune`: the user CLI.

    kubetune validate FILE...          check job YAMLs with no cluster
    kubetune run FILE [--store URI]    run a job locally (CPU), results in ./runs/<job>/
    kubetune serve MODEL [...]         serve a trained model over HTTP

Heavy imports (torch, the trainer) happen only in the run and serve modules, so `validate`
stays fast and works with only the operator extra installed.
"""

from __future__ import annotations

import argparse
import sys

from kubetune_operator.cli.cluster import add_cluster_commands
from kubetune_operator.cli.validate import cmd_validate


def _cmd_run(args: argparse.Namespace) -> int:
    from kubetune_operator.cli.run import cmd_run

    return cmd_run(args)


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
    p.set_defaults(func=_cmd_run)

    add_cluster_commands(sub)

    p = sub.add_parser("serve", help="serve a trained model (OpenAI-style API)")
    p.add_argument("model", help="model directory or s3:// prefix written by the trainer")
    p.set_defaults(func=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "serve":
        # The trainer runtime loads only for the commands that need it.
        from kubetune_operator.cli.serve import cmd_serve

        return cmd_serve(args, extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
