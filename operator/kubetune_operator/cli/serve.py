"""`kubetune serve MODEL`: the inference server for a trained model.

One of the two CLI modules allowed to load the trainer runtime (torch): see cli/__init__.py.
"""

from __future__ import annotations

import argparse


def cmd_serve(args: argparse.Namespace, extra: list[str]) -> int:
    from kubetune_trainer.serve.server import main as serve_main

    return serve_main(["--model", args.model, *extra])
