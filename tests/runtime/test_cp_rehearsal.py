"""Rehearsal of the 8B RL layout on CPU: TP=2 x CP=2 on 4 gloo ranks.

The shipped recipe (examples/dapo_longact-qwen3_8b.yaml) runs TP=2, CP=4, SP; here the same
code path at CP=2, without sequence parallel (megatron's local spec norm asserts SP off,
``transformer/torch_norm.py`` ~32, until an SP-capable norm lands): SFT cold start, then DAPO + LongAct from its checkpoint, through the real
loops (``run_sft``, ``run_rl``), the local CP attention and the native rollout engine. Ends
with finite, falling SFT losses, finite RL steps with LongAct masks, and a checkpoint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from megatron_longact.runtime.launch import run_local

LAYOUT = ["parallel.tensor_model_parallel_size=2", "parallel.context_parallel_size=2"]
COMMON = ["model.preset=micro-qwen3", "logging.progress=false", "train.seed=1234", *LAYOUT]


def _job(overrides: list[str], command: str) -> None:
    from megatron_longact.config import JobConfig, load_config
    from megatron_longact.rl.loop import run_rl
    from megatron_longact.sft.loop import run_sft

    job = load_config(JobConfig, None, overrides)
    (run_sft if command == "sft" else run_rl)(job)


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_tp2_cp2_sft_then_dapo_longact(synthetic_data_dir, tmp_path):
    run_local(_job, 4, [
        *COMMON, f"data.train_path={synthetic_data_dir / 'sft_train.jsonl'}",
        "data.seq_length=256", "data.micro_batch_size=2", "data.global_batch_size=4",
        "optim.lr=3e-3", "optim.min_lr=3e-4", "optim.warmup_steps=2", "train.train_steps=12",
        f"checkpoint.save_dir={tmp_path / 'sft'}", f"logging.tensorboard_dir={tmp_path / 'sft_tb'}",
    ], "sft")  # fmt: skip
    sft = _metrics(tmp_path / "sft_tb" / "metrics.jsonl")
    losses = [m["train/loss"] for m in sft]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses
    assert (tmp_path / "sft" / "latest").is_file()

    run_local(_job, 4, [
        *COMMON, f"data.train_path={synthetic_data_dir / 'rl_train.jsonl'}",
        f"checkpoint.load_dir={tmp_path / 'sft'}", f"checkpoint.save_dir={tmp_path / 'rl'}",
        f"logging.tensorboard_dir={tmp_path / 'rl_tb'}",
        "optim.lr=1e-3", "optim.min_lr=1e-3", "optim.warmup_steps=0", "train.train_steps=3",
        "data.micro_batch_size=4", "rl.prompts_per_step=4", "rl.rollouts_per_prompt=4",
        "rl.max_new_tokens=32", "rl.max_seq_length=256", "rl.dynamic_sampling=false",
        "longact.strategy=massive", "longact.ratio=0.3",
    ], "rl")  # fmt: skip
    rl = _metrics(tmp_path / "rl_tb" / "metrics.jsonl")
    assert [m["step"] for m in rl] == [1, 2, 3]
    for m in rl:
        assert all(math.isfinite(v) for v in m.values() if isinstance(v, float)), m
    fractions = [v for k, v in rl[-1].items() if k.endswith("q_trainable_frac")]
    assert fractions and all(0.2 < f < 0.4 for f in fractions), rl[-1]
    assert (tmp_path / "rl" / "latest").is_file()
