"""End to end on CPU: SFT cold start, then DAPO + LongAct; the reward rises (logged metrics)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from megatron_longact.runtime.launch import run_local


def _job(overrides: list[str], command: str):
    from megatron_longact.config import JobConfig, load_config
    from megatron_longact.rl.loop import run_rl
    from megatron_longact.sft.loop import run_sft

    job = load_config(JobConfig, None, overrides)
    return (run_sft if command == "sft" else run_rl)(job)


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def sft_checkpoint(synthetic_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    run_local(_job, 1, [
        "model.preset=micro-qwen3", f"data.train_path={synthetic_data_dir / 'sft_train.jsonl'}",
        "data.seq_length=256", "data.micro_batch_size=4", "data.global_batch_size=8",
        "optim.lr=3e-3", "optim.min_lr=3e-4", "train.train_steps=120",
        f"checkpoint.save_dir={out / 'ckpt'}", f"logging.tensorboard_dir={out / 'tb'}",
        "logging.progress=false",
    ], "sft")  # fmt: skip
    return out / "ckpt"


def test_dapo_with_longact_raises_reward(synthetic_data_dir, sft_checkpoint, tmp_path):
    run_local(_job, 1, [
        "model.preset=micro-qwen3", f"data.train_path={synthetic_data_dir / 'rl_train.jsonl'}",
        f"checkpoint.load_dir={sft_checkpoint}", f"checkpoint.save_dir={tmp_path / 'ckpt'}",
        f"logging.tensorboard_dir={tmp_path / 'tb'}", "logging.progress=false",
        "optim.lr=1e-3", "optim.min_lr=1e-3", "optim.warmup_steps=0", "optim.adam_beta2=0.99",
        "train.train_steps=10", "data.micro_batch_size=8",
        "rl.prompts_per_step=4", "rl.rollouts_per_prompt=4", "rl.max_new_tokens=40",
        "rl.max_seq_length=256", "rl.dynamic_sampling=false",
        "longact.strategy=massive", "longact.ratio=0.3",
    ], "rl")  # fmt: skip
    metrics = _metrics(tmp_path / "tb" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 11))
    rewards = [m["rollout/reward_mean"] for m in metrics]
    assert statistics.fmean(rewards[-3:]) > statistics.fmean(rewards[:3]) + 0.1, rewards
    # LongAct was on: about lambda of the Q/K rows trained.
    fractions = [v for k, v in metrics[-1].items() if "trainable" in k]
    assert fractions and all(0.2 < f < 0.4 for f in fractions), metrics[-1]
    assert (tmp_path / "ckpt" / "latest").is_file()
