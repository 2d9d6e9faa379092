"""The same data at every layout: SFT with packing and RL updates give the same losses at
CP=1 and CP=2 over several steps (a layout change is a pure re-sharding).

SFT used to pad every sample to a multiple of 2 x CP *before* packing, so the bins (and the
losses, 6% apart after 3 steps) depended on CP; samples are now padded to the layout-free
``data.sequence_multiple``. RL packs by unpadded length and pads afterwards (``rl.batch``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_longact.runtime.launch import run_local

STEPS = 3


def _sft(overrides: list[str]) -> None:
    from megatron_longact.config import JobConfig, load_config
    from megatron_longact.sft.loop import run_sft

    run_sft(load_config(JobConfig, None, overrides))


def _sft_losses(data_dir: Path, out: Path, parallel: list[str], world: int) -> list[float]:
    run_local(_sft, world, [
        "model.preset=micro-qwen3", "model.attention_backend=local", "logging.progress=false",
        "train.precision=fp32", f"data.train_path={data_dir / 'sft_train.jsonl'}",
        "data.seq_length=256", "data.micro_batch_size=2", "data.global_batch_size=4",
        "optim.lr=3e-3", "optim.warmup_steps=0", f"train.train_steps={STEPS}",
        f"logging.tensorboard_dir={out}", *parallel,
    ])  # fmt: skip
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [row["train/loss"] for row in rows]


@pytest.mark.slow
def test_sft_packed_cp2_equals_cp1(synthetic_data_dir, tmp_path):
    one = _sft_losses(synthetic_data_dir, tmp_path / "cp1", [], 1)
    two = _sft_losses(synthetic_data_dir, tmp_path / "cp2", ["parallel.context_parallel_size=2"], 2)
    assert len(one) == STEPS
    assert two == pytest.approx(one, rel=1e-5, abs=1e-6)


def _rl_losses(overrides: list[str]) -> list[float]:
    """STEPS RL updates (old log-probs recomputed each step) on the same scored samples."""
    from test_rl_packing import BASE, samples  # tests/rl is on sys.path (pytest rootdir)

    from megatron_longact.config import JobConfig, load_config
    from megatron_longact.rl.step import policy_updates, step_micro_batches
    from megatron_longact.runtime.distributed import init_distributed
    from megatron_longact.runtime.setup import setup_train_state

    job = load_config(JobConfig, None, [*BASE, "longact.strategy=none", *overrides])
    state = setup_train_state(job, init_distributed(job.parallel, seed=3))
    losses = []
    for step in range(1, STEPS + 1):
        updates, _ = step_micro_batches(job, state, samples(step), pad_token_id=0)
        for batch in (b for u in updates for b in u):
            if "old_logp" in batch:
                batch["old_logp"] = batch["old_logp"] + batch["engine_logp"]
        losses.append(policy_updates(job, state, updates, step=step).loss)
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["dapo", "grpo"])
def test_rl_packed_cp2_equals_cp1_over_steps(algorithm):
    extra = [f"rl.algorithm={algorithm}", "rl.max_tokens_per_microbatch=48"]
    (one,) = run_local(_rl_losses, 1, extra)
    for two in run_local(_rl_losses, 2, ["parallel.context_parallel_size=2", *extra]):
        assert two == pytest.approx(one, rel=1e-5, abs=1e-6)
