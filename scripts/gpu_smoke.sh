#!/usr/bin/env bash
# GPU smoke check of the trainer and server (NCCL, bf16, ZeRO-2, LoRA, QLoRA's error, serving on
# CUDA), for a lent GPU machine whose image has CUDA torch but none of our other packages:
# wheels carried in .whl/ are installed to /tmp/site first. Writes results under $OUT (or ./gpu-out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
WHEELS=${WHEELS:-.whl}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/operator:$PWD/trainer PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export KUBETUNE_CACHE=/tmp/ktcache DS_BUILD_OPS=0 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, deepspeed, transformers, peft; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'bf16', torch.cuda.is_bf16_supported(), 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__)"
CHAT=$PWD/examples/data/support-chat
run() {  # run NAME JSON-OVERRIDES
  local name=$1 over=$2 dir=/tmp/gpu/$1
  mkdir -p "$dir"
  python3 - "$dir" "$over" "$CHAT" <<'PY'
import json, sys
d, over, chat = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
cfg = {"task": "causal-lm", "model": {"source": "builtin:tiny-llama", "maxSeqLength": 256},
  "data": {"train": f"{chat}/train.jsonl", "validation": f"{chat}/validation.jsonl", "test": f"{chat}/test.jsonl", "format": "chat", "packing": True},
  "method": "full", "hyperparameters": {"learningRate": 3e-3, "perDeviceBatchSize": 16, "epochs": 3, "maxSteps": 40, "warmupRatio": 0.05},
  "deepspeed": {"zeroStage": 2}, "checkpointing": {"everySteps": 20, "keepLast": 1},
  "evaluation": {"everySteps": 20, "bleuSamples": 8, "maxNewTokens": 16},
  "job": {"name": "gpu", "namespace": "smoke"}, "output": {"uri": f"{d}/store"},
  "telemetry": {"metricsPort": 0, "terminationLog": f"{d}/termination-log"}}
for k, v in over.items():
    cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
json.dump(cfg, open(f"{d}/config.json", "w"))
PY
  local t0=$SECONDS
  timeout 240 python3 -m kubetune_trainer train --config "$dir/config.json" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc in $((SECONDS - t0)) s; termination: $(head -c 300 "$dir/termination-log" 2>/dev/null)"
  [ -f "$dir/store/eval.json" ] && python3 -c "
import json; r = json.load(open('$dir/store/eval.json')); t = r['training']
print('   precision', t['precision'], 'steps', t['steps'], 'stepSeconds', t.get('stepSeconds'), 'tok/s', round(t['tokensSeen'] / max(t.get('stepSeconds') or 1e-9, 1e-9)))
print('   base', {k: round(v, 4) for k, v in (r['base'] or {}).items() if isinstance(v, float)})
print('   tuned', {k: round(v, 4) for k, v in r['tuned'].items() if isinstance(v, float)})"
  tail -n 3 "$OUT/$name.log"
}
ONLY=${ONLY:-full-zero2-bf16 lora-zero0 full-zero3 qlora}
want() { [[ " $ONLY " == *" $1 "* ]]; }
want full-zero2-bf16 && run full-zero2-bf16 '{}'
want lora-zero0 && run lora-zero0 '{"method": "lora", "lora": {"r": 8, "alpha": 16, "merge": true}, "deepspeed": {"zeroStage": 0}}'
want full-zero3 && run full-zero3 '{"deepspeed": {"zeroStage": 3}, "hyperparameters": {"maxSteps": 20}}'
want qlora && run qlora '{"method": "qlora", "lora": {"r": 8, "alpha": 16}}'
# Serve the ZeRO-2 model on the GPU and ask it something.
python3 -m kubetune_trainer serve --model /tmp/gpu/full-zero2-bf16/store/model --host 127.0.0.1 --port 18080 > "$OUT/serve.log" 2>&1 &
SP=$!
for _ in $(seq 60); do curl -sf localhost:18080/readyz >/dev/null && break; sleep 1; done
curl -s localhost:18080/v1/chat/completions -d '{"messages":[{"role":"user","content":"My printer is offline"}],"max_tokens":24}' | head -c 600; echo
kill -TERM $SP; wait $SP; echo "serve exit $?"
grep -i -m3 "cuda\|device" "$OUT/serve.log"
