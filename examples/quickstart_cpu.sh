#!/usr/bin/env bash
# The whole pipeline on one CPU, on the tiny Qwen3-shaped model:
#   synthetic long-context data -> SFT cold start -> DAPO + LongAct -> Hugging Face export
#   -> evaluation table (SFT vs RL) -> training-curve plot.
# Every stage resumes from its checkpoint or skips its output when re-run. Outputs: runs/quickstart/.
# Extra arguments are dotted overrides for both training stages (e.g. train.seed=7).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/quickstart}

if [ ! -f "$OUT/data/sft_train.jsonl" ]; then
  # Short documents with one fact each: a 4-layer model learns to copy the fact within the
  # CPU budget (with 4 facts in 256 tokens it learns the format only: 0% held-out).
  longact data --out-dir "$OUT/data" --context-tokens 48 --num-facts 1 \
    --sft-train 4000 --sft-val 40 --rl-train 400 --rl-val 100
fi

longact sft --config examples/quickstart_cpu.yaml "$@"
longact rl --config examples/quickstart_rl_cpu.yaml "$@"

if [ ! -f "$OUT/hf/config.json" ]; then
  longact convert --direction mcore2hf --load "$OUT/rl/checkpoints" --out "$OUT/hf"
fi

# Held-out tasks: the synthetic key-value retrieval (rl_val) and RULER NIAH at 512 tokens,
# greedy decoding with the megatron model itself (eval.backend=vllm takes the HF export).
eval_args=(model.preset=tiny-qwen3 "eval.synthetic_kv_path=$OUT/data/rl_val.jsonl"
  "eval.ruler_lengths=[512]" eval.ruler_num_samples=8 eval.max_new_tokens=64)
longact eval "${eval_args[@]}" "checkpoint.load_dir=$OUT/sft/checkpoints" \
  eval.model_name=SFT "eval.out_dir=$OUT/eval/sft"
longact eval "${eval_args[@]}" "checkpoint.load_dir=$OUT/rl/checkpoints" \
  "eval.model_name=SFT w/ DAPO + LongAct" "eval.out_dir=$OUT/eval/rl" \
  "eval.compare=[$OUT/eval/sft]"

python tools/plot_training.py --sft "$OUT/sft/tensorboard/metrics.jsonl" \
  --rl "$OUT/rl/tensorboard/metrics.jsonl" --out "$OUT/curves.png"
echo "done: tables in $OUT/eval/rl/table_*.md, curves in $OUT/curves.png, HF model in $OUT/hf"
