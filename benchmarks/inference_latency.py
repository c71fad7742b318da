"""Latency and throughput of /v1/classify over real HTTP versus calling the model in-process.

    PYTHONPATH=trainer python benchmarks/inference_latency.py [--model DIR] [--requests 200]

Server side: ``python -m kubetune_trainer serve`` runs as a subprocess on loopback; clients send
one text per request, at concurrency 1 and 16 (the server micro-batches concurrent requests).
In-process side: the same ClassifierEngine the server uses, called on the same texts in batches
of 1 and 16. Without ``--model`` a MiniLM classifier with a fresh 3-label head is built into a
temporary directory. The last line prints server/in-process ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "trainer")]

from kubetune_trainer.evaluate.modelcard import ModelCard, read_model_card, write_model_card  # noqa: E402

_SUBJECTS = ["my router", "the invoice", "my password", "the app", "my order", "the printer"]
_PROBLEMS = ["keeps failing", "was charged twice", "does not work", "is missing", "crashed again"]


def make_texts(n: int) -> list[str]:
    """Deterministic, varied support messages (different lengths, so padding is realistic)."""
    return [
        f"Hello, {_SUBJECTS[i % 6]} {_PROBLEMS[i % 5]} since {i % 28 + 1} days. "
        + "Please help me, I already tried restarting it. " * (1 + i % 4)
        for i in range(n)
    ]


def build_default_model(out: Path) -> Path:
    import transformers

    from kubetune_trainer.models.builtin import resolve_builtin

    labels = ["billing", "technical", "escalate"]
    base = resolve_builtin("minilm")
    auto_model: Any = transformers.AutoModelForSequenceClassification
    auto_tok: Any = transformers.AutoTokenizer
    auto_tok.from_pretrained(str(base)).save_pretrained(str(out))
    auto_model.from_pretrained(str(base), num_labels=len(labels)).save_pretrained(str(out))
    card = ModelCard(
        task="sequence-classification",
        base_model="builtin:minilm",
        method="full",
        adapter=False,
        labels=labels,
        max_seq_length=128,
        data_fingerprint="benchmark",
        seed=0,
        created_at="1970-01-01T00:00:00Z",
        kubetune_version="benchmark",
    )
    write_model_card(out, card)
    return out


@dataclass
class Result:
    mode: str
    concurrency: int
    latencies: list[float]
    wall: float

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.wall

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def bench_in_process(model_dir: Path, texts: list[str], batch: int) -> Result:
    from kubetune_trainer.serve.engines import ClassifierEngine

    engine = ClassifierEngine(model_dir, read_model_card(model_dir))
    for _ in range(3):  # warm-up: first calls pay for lazy initialisation
        engine.classify(texts[:batch])
    latencies: list[float] = []
    started = time.perf_counter()
    for i in range(0, len(texts), batch):
        chunk = texts[i : i + batch]
        t0 = time.perf_counter()
        engine.classify(chunk)
        latencies += [time.perf_counter() - t0] * len(chunk)  # every text waited for its batch
    return Result("in-process", batch, latencies, time.perf_counter() - started)


async def bench_server(url: str, texts: list[str], concurrency: int) -> Result:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        for text in texts[:concurrency]:  # warm-up: connections and first batches
            (await client.post("/v1/classify", json={"text": text})).raise_for_status()
        latencies: list[float] = []
        queue = list(reversed(texts))

        async def worker() -> None:
            while queue:
                text = queue.pop()
                t0 = time.perf_counter()
                response = await client.post("/v1/classify", json={"text": text})
                latencies.append(time.perf_counter() - t0)
                response.raise_for_status()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return Result("server", concurrency, latencies, time.perf_counter() - started)


def start_server(model_dir: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "trainer"), str(ROOT)])}
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kubetune_trainer", "serve", "--model", str(model_dir),
             "--port", str(port), "--max-concurrency", "64", "--log-level", "warning"],
            stdout=fh, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)  # readiness polling interval
    proc.kill()
    raise SystemExit("server did not become ready")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--model", type=Path, help="classifier model dir (default: build MiniLM)")
    p.add_argument("--requests", type=int, default=200, help="requests per run (default 200)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The server sets this too; both sides must run OpenMP the same way to be comparable.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    texts = make_texts(args.requests)
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as tmp:
        model_dir = args.model or build_default_model(Path(tmp) / "minilm-classifier")
        results = [bench_in_process(model_dir, texts, b) for b in (1, 16)]
        proc, url = start_server(model_dir, Path(tmp) / "server.log")
        try:
            for concurrency in (1, 16):
                results.append(asyncio.run(bench_server(url, texts, concurrency)))
        finally:
            proc.terminate()
            proc.wait(timeout=60)

    print(
        f"{'mode':<12}{'conc/batch':>11}{'requests':>10}{'p50 ms':>10}{'p99 ms':>10}{'req/s':>10}"
    )
    for r in results:
        print(
            f"{r.mode:<12}{r.concurrency:>11}{len(r.latencies):>10}"
            f"{r.pct(0.5) * 1e3:>10.2f}{r.pct(0.99) * 1e3:>10.2f}{r.throughput:>10.1f}"
        )
    by_key = {(r.mode, r.concurrency): r for r in results}
    parts = []
    for c in (1, 16):
        server, local = by_key[("server", c)], by_key[("in-process", c)]
        parts.append(
            f"c{c}: throughput {server.throughput / local.throughput:.2f}x, "
            f"p50 {server.pct(0.5) / local.pct(0.5):.2f}x"
        )
    print("ratio server/in-process: " + "; ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
