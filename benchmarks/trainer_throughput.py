"""Training throughput: a plain HF Trainer script against the kubetune trainer, side by side.

    python benchmarks/trainer_throughput.py [--model builtin:tiny-llama] [--steps 40]

Same model, data (the bundled support-chat dialogues, chat template applied), batch size,
learning rate, sequence length and number of optimizer steps. Each run is a child process of
this script, one after another so they never share the CPU:

- ``hf-trainer``: ``transformers.Trainer`` (``use_cpu=True``), padding per batch
  (``DataCollatorForSeq2Seq``), what a user would write by hand;
- ``kubetune``: ``python -m kubetune_trainer train``, padding per batch;
- ``kubetune+packing``: the same with ``data.packing: true``.

Timing counts the optimizer steps with their batch collation on both sides (the time between
one step's end and the next), no evaluation, checkpointing or model loading. ``tokens/s``
counts every input position, padding included; ``useful tokens/s`` counts non-padding tokens
only. The ratios come last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "trainer")]
CHAT = ROOT / "examples" / "data" / "support-chat"
ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def model_dir(source: str) -> Path:
    from kubetune_trainer.models.builtin import resolve_builtin

    if source.startswith("builtin:"):
        return resolve_builtin(source.removeprefix("builtin:"))
    return Path(source)


def hf_trainer_worker(args: argparse.Namespace, out: Path) -> None:
    """The baseline: what a plain transformers script does with the same inputs."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    path = model_dir(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    rows = [json.loads(line) for line in (CHAT / "train.jsonl").read_text().splitlines() if line]
    samples = []
    for row in rows:
        ids = tok.apply_chat_template(row["messages"], tokenize=True)
        if hasattr(ids, "keys"):  # some tokenizers return a BatchEncoding
            ids = ids["input_ids"]
        ids = list(ids)[: args.max_length]
        samples.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids})
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    class Count(TrainerCallback):  # type: ignore[misc]
        """Time between step ends (batch collation included), as the kubetune loop counts it."""

        seconds = 0.0
        last = 0.0

        def on_train_begin(self, *a: Any, **k: Any) -> None:
            Count.last = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            now = time.perf_counter()
            Count.seconds += now - Count.last
            Count.last = now

    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    positions = tokens = 0

    def counting(features: list[dict[str, Any]]) -> dict[str, Any]:
        nonlocal positions, tokens
        batch = collator(features)
        positions += batch["input_ids"].numel()
        tokens += int(batch["attention_mask"].sum())
        return batch  # type: ignore[no-any-return]

    targs = TrainingArguments(
        output_dir=str(out.parent / "hf-out"),
        use_cpu=True,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        max_steps=args.steps,
        warmup_steps=0,
        lr_scheduler_type="linear",
        weight_decay=0.0,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        seed=42,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=samples,  # a list is a map-style dataset
        data_collator=counting,
        callbacks=[Count()],
    )
    trainer.train()
    out.write_text(
        json.dumps(
            {
                "steps": args.steps,
                "seconds": Count.seconds,
                "positions": positions,
                "tokens": tokens,
            }
        )
    )


def kubetune_run(args: argparse.Namespace, work: Path, *, packing: bool) -> dict[str, Any]:
    cfg = {
        "task": "causal-lm",
        "model": {"source": args.model, "maxSeqLength": args.max_length},
        "data": {
            "train": str(CHAT / "train.jsonl"),
            "format": "chat",
            "packing": packing,
            "validation": str(CHAT / "validation.jsonl"),  # all of train is trained on
            "validationSplit": 0.0,
        },
        "method": "full",
        "hyperparameters": {
            "learningRate": args.learning_rate,
            "perDeviceBatchSize": args.batch_size,
            "epochs": 100,
            "maxSteps": args.steps,
            "warmupRatio": 0.0,
            "weightDecay": 0.0,
        },
        "deepspeed": {"zeroStage": 0},
        "checkpointing": {"everySteps": 100000, "keepLast": 1},
        "evaluation": {
            "compareBase": False,
            "bleuSamples": 1,
            "maxNewTokens": 4,
            "everySteps": 100000,
        },
        "job": {"name": "bench", "namespace": "bench"},
        "output": {"uri": str(work / "store")},
        "telemetry": {"metricsPort": 0, "terminationLog": str(work / "termination-log")},
    }
    path = work / "config.json"
    path.write_text(json.dumps(cfg))
    cmd = [sys.executable, "-m", "kubetune_trainer", "train", "--config", str(path)]
    proc = subprocess.run(cmd, env={**os.environ, **ENV}, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"kubetune trainer failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    training = json.loads((work / "store" / "eval.json").read_text())["training"]
    return {
        "steps": training["steps"],
        "seconds": training["stepSeconds"],
        "positions": training["positionsSeen"],
        "tokens": training["tokensSeen"],
    }


def hf_run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    out = work / "hf.json"
    cmd = [sys.executable, __file__, "--worker", str(out), *sys.argv[1:]]
    proc = subprocess.run(cmd, env={**os.environ, **ENV}, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"HF Trainer baseline failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="builtin:tiny-llama", help="builtin:NAME or a local dir")
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--learning-rate", type=float, default=1e-3)
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        hf_trainer_worker(args, args.worker)
        return
    model_dir(args.model)  # build/convert a builtin once, outside every timed run
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as tmp:
        for name in ("hf-trainer", "kubetune", "kubetune+packing"):
            work = Path(tmp) / name
            work.mkdir()
            print(f"running {name} ({args.steps} steps of {args.batch_size})...", flush=True)
            if name == "hf-trainer":
                results[name] = hf_run(args, work)
            else:
                results[name] = kubetune_run(args, work, packing=name.endswith("packing"))
    print()
    print(f"model {args.model}, batch {args.batch_size}, max length {args.max_length}, CPU")
    print(f"{'run':<18}{'steps':>6}{'step s':>9}{'tokens/s':>11}{'useful tok/s':>14}{'padding':>9}")
    rate: dict[str, tuple[float, float]] = {}
    for name, r in results.items():
        secs = max(r["seconds"], 1e-9)
        rate[name] = (r["positions"] / secs, r["tokens"] / secs)
        pad = 1 - r["tokens"] / max(r["positions"], 1)
        print(
            f"{name:<18}{r['steps']:>6}{secs:>9.1f}{rate[name][0]:>11.0f}"
            f"{rate[name][1]:>14.0f}{pad:>9.1%}"
        )
    hf, kt, kp = rate["hf-trainer"], rate["kubetune"], rate["kubetune+packing"]
    print()
    print(f"ratio kubetune/hf-trainer tokens/s:               {kt[0] / hf[0]:.2f}")
    print(f"ratio kubetune/hf-trainer useful tokens/s:        {kt[1] / hf[1]:.2f}")
    print(f"ratio kubetune+packing/hf-trainer useful tokens/s: {kp[1] / hf[1]:.2f}")


if __name__ == "__main__":
    main()
