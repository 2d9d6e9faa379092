"""SFT on the tiny Qwen3-MoE: expert parallel gives the same training as experts kept whole.

Same data, same HF start, several steps: losses, grad norms (over every gradient, after the
DP/EP reduces) and the router's load-balancing loss agree for EP=1 (2 ranks, DP=2), EP=2 (2 ranks) and
EP=2 x TP=2 with sequence parallel (4 ranks, experts whole inside each EP rank: ETP=1).
Grads, not parameters after many Adam steps, are what is compared. A resumed EP=2 run
continues the exact loss trajectory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import moe_worlds as worlds
import pytest

from megatron_longact.runtime.launch import run_local

EP2 = ["parallel.expert_model_parallel_size=2"]


@pytest.fixture(scope="module")
def reference(tiny_moe):
    return run_local(worlds.train_steps, 2, str(tiny_moe.hf_dir), [])[0]


def _assert_same(ref: dict, results: list[dict]) -> None:
    assert results and len(ref["steps"]) == worlds.STEPS
    for res in results:
        for (loss_r, norm_r, lb_r), (loss, norm, lb) in zip(
            ref["steps"], res["steps"], strict=True
        ):
            assert loss == pytest.approx(loss_r, abs=1e-6)
            assert norm == pytest.approx(norm_r, rel=1e-5)
            assert lb == pytest.approx(lb_r, rel=1e-5)


def test_reference_trains_and_logs_the_aux_loss(reference):
    losses = [loss for loss, _, _ in reference["steps"]]
    assert len(set(losses)) == worlds.STEPS  # a new batch each step
    # Switch loss: 1 at perfect balance, up to num_experts / top-k when collapsed.
    assert all(0.9 < lb < 4.0 for _, _, lb in reference["steps"])


def test_expert_parallel_2_matches_experts_whole(reference, tiny_moe):
    results = run_local(worlds.train_steps, 2, str(tiny_moe.hf_dir), EP2)
    assert [r["ep"] for r in results] == [2, 2]
    _assert_same(reference, results)


@pytest.mark.slow
def test_expert_parallel_2_with_tensor_parallel_2_matches(reference, tiny_moe):
    overrides = EP2 + [
        "parallel.tensor_model_parallel_size=2",
        "parallel.sequence_parallel=true",
        "parallel.expert_tensor_parallel_size=1",
    ]
    results = run_local(worlds.train_steps, 4, str(tiny_moe.hf_dir), overrides)
    assert {(r["ep"], r["tp"]) for r in results} == {(2, 2)}
    _assert_same(reference, results)


def _sft(overrides: list[str]):
    from megatron_longact.config import JobConfig, load_config
    from megatron_longact.sft.loop import run_sft

    return run_sft(load_config(JobConfig, None, overrides))


def _overrides(hf_dir: Path, data_dir: Path, run_dir: Path) -> list[str]:
    return [
        f"model.hf_path={hf_dir}",
        *EP2,
        f"data.train_path={data_dir / 'sft_train.jsonl'}",
        "data.seq_length=256",
        "data.micro_batch_size=1",
        "data.global_batch_size=4",
        "optim.lr=2e-3",
        "train.train_steps=4",
        "train.precision=fp32",
        f"checkpoint.save_dir={run_dir / 'ckpt'}",
        "checkpoint.save_interval=2",
        f"logging.tensorboard_dir={run_dir / 'tb'}",
        "logging.progress=false",
    ]


def _metrics(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "tb" / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "train/loss" in r}


@pytest.mark.slow
def test_resume_at_expert_parallel_2_is_exact(tiny_moe, synthetic_data_dir, tmp_path):
    """Steps 3-4 after resuming step 2 equal the uninterrupted run's bit for bit: weights and
    both members of megatron's ChainedOptimizer (dense over DP, experts over expert-DP) come
    back. (A checkpoint-key check that missed ChainedOptimizer's ``chained_<i>.`` prefix once
    restored neither member, silently: weights only, fresh Adam moments.)"""
    full = tmp_path / "full"
    run_local(_sft, 2, _overrides(tiny_moe.hf_dir, synthetic_data_dir, full))
    reference = _metrics(full)
    assert sorted(reference) == [1, 2, 3, 4]
    assert all("train/moe/load_balancing_loss" in m for m in reference.values())
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "ckpt" / "iter_0000002", resumed / "ckpt" / "iter_0000002")
    (resumed / "ckpt" / "latest").write_text("iter_0000002\n")
    run_local(_sft, 2, _overrides(tiny_moe.hf_dir, synthetic_data_dir, resumed))
    again = _metrics(resumed)
    assert sorted(again) == [3, 4]
    for step in (3, 4):
        assert again[step]["train/loss"] == reference[step]["train/loss"]
        assert again[step]["train/grad_norm"] == reference[step]["train/grad_norm"]
