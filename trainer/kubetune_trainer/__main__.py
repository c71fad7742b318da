"""`python -m kubetune_trainer train|serve`: what trainer pods run.

    train --config FILE        (or the config JSON in $KUBETUNE_CONFIG)
    serve --model DIR|s3://... [--host --port --max-concurrency ...]

`train` exits with the codes documented in kubetune_trainer.errors, after writing a one-line
reason to the termination log, so the operator can tell retryable failures from permanent ones.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from kubetune_trainer.config import TrainerConfig

CONFIG_ENV = "KUBETUNE_CONFIG"
log = logging.getLogger("kubetune_trainer")


def load_config(path: str | None) -> TrainerConfig:
    if path:
        text = Path(path).read_text(encoding="utf-8")
    elif os.environ.get(CONFIG_ENV):
        text = os.environ[CONFIG_ENV]
    else:
        raise SystemExit(f"no trainer config: pass --config FILE or set ${CONFIG_ENV}")
    return TrainerConfig.model_validate(json.loads(text))


def train_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubetune_trainer train")
    parser.add_argument("--config", help="TrainerConfig JSON file (default: $KUBETUNE_CONFIG)")
    parser.add_argument("--base-dir", help="folder that relative data paths resolve against")
    parser.add_argument("--termination-log", help="override telemetry.terminationLog")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from kubetune_trainer.errors import classify_failure
    from kubetune_trainer.telemetry.termination import write_termination_message

    termination_log = args.termination_log or os.environ.get("KUBETUNE_TERMINATION_LOG")
    try:
        cfg = load_config(args.config)
        if termination_log:
            cfg.telemetry.termination_log = termination_log
        termination_log = cfg.telemetry.termination_log
        from kubetune_trainer.train.run import run

        result = run(cfg, base_dir=Path(args.base_dir) if args.base_dir else None)
    except (Exception, KeyboardInterrupt) as exc:
        reason, message, code = classify_failure(exc)
        log.error("%s: %s", reason, message)
        if not isinstance(exc, ValidationError) and reason == "Error":
            log.exception("unexpected failure")
        write_termination_message(termination_log or "/dev/termination-log", reason, message)
        return code
    # Only after success: after a failure a peer may be gone mid-collective, and tearing down
    # could block the exit that lets the operator restart the gang.
    _leave_process_group()
    log.info("done: %d steps, model at %s", result.steps, result.model_uri)
    return 0


def _leave_process_group() -> None:
    """Tear the process group down before exit: an NCCL group left to interpreter shutdown
    was seen to hang a finished run (H100, torch 2.11) until the pod's deadline."""
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as err:  # exiting anyway; never turn success into a failure here
            log.warning("could not destroy the process group: %s", err)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in ("train", "serve"):
        print("usage: python -m kubetune_trainer {train,serve} ...", file=sys.stderr)
        return 2
    if args[0] == "serve":
        from kubetune_trainer.serve.server import main as serve_main

        return serve_main(args[1:])
    return train_main(args[1:])


if __name__ == "__main__":
    sys.exit(main())
