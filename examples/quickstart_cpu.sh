#!/usr/bin/env bash
# The whole pipeline on one CPU in a few minutes, on the tiny Qwen3-shaped model:
# synthetic long-context data -> SFT cold start -> DAPO + LongAct -> Hugging Face export -> eval.
# Every stage resumes from its checkpoint if re-run; outputs go to runs/quickstart/.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/quickstart}

if [ ! -f "$OUT/data/sft_train.jsonl" ]; then
  longact data --out-dir "$OUT/data" --context-tokens 256 \
    --sft-train 1200 --sft-val 40 --rl-train 400 --rl-val 64
fi

longact sft --config examples/quickstart_cpu.yaml "$@"
