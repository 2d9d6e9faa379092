"""Checkpoints: resume continues the exact loss trajectory; TP=2 saves load at TP=1; a crash
mid-save never spoils the last good checkpoint."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from megatron_longact.checkpoint import latest_checkpoint, verify_checkpoint
from megatron_longact.runtime.launch import run_local


def _overrides(data_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "model.preset=micro-qwen3",
        f"data.train_path={data_dir / 'sft_train.jsonl'}",
        f"data.val_path={data_dir / 'sft_val.jsonl'}",
        "data.seq_length=256",
        "data.micro_batch_size=2",
        "data.global_batch_size=4",
        "optim.lr=2e-3",
        "train.train_steps=4",
        f"checkpoint.save_dir={run_dir / 'ckpt'}",
        "checkpoint.save_interval=2",
        "checkpoint.keep_last=5",
        f"logging.tensorboard_dir={run_dir / 'tb'}",
        "logging.progress=false",
        *extra,
    ]


def _sft(overrides: list[str]):
    from megatron_longact.config import JobConfig, load_config
    from megatron_longact.sft.loop import run_sft

    return run_sft(load_config(JobConfig, None, overrides))


def _losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "tb" / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["train/loss"] for r in map(json.loads, lines)}


def _weights(path: Path, tp: int):
    from megatron_longact.checkpoint import load_checkpoint
    from megatron_longact.config import JobConfig, load_config
    from megatron_longact.runtime.distributed import init_distributed
    from megatron_longact.runtime.params import full_named_parameters
    from megatron_longact.runtime.setup import setup_train_state

    job = load_config(JobConfig, None, ["model.preset=micro-qwen3",
                                        f"parallel.tensor_model_parallel_size={tp}"])  # fmt: skip
    state = setup_train_state(job, init_distributed(job.parallel, seed=999))
    fresh = full_named_parameters(state.model[0])
    load_checkpoint(path, model=state.model, optimizer=state.optimizer, scheduler=state.scheduler)
    return full_named_parameters(state.model[0]), fresh


def test_resume_continues_exact_trajectory(synthetic_data_dir, tmp_path):
    full = tmp_path / "full"
    run_local(_sft, 1, _overrides(synthetic_data_dir, full))
    reference = _losses(full)
    assert sorted(reference) == [1, 2, 3, 4]
    # Every save carries checksums of all its files (checked on each load).
    for step in (2, 4):
        assert verify_checkpoint(full / "ckpt" / f"iter_{step:07d}") is None
        assert (full / "ckpt" / f"iter_{step:07d}" / "checksums.json").is_file()

    # Simulate a job killed after step 2 with a save of step 4 half written.
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "ckpt" / "iter_0000002", resumed / "ckpt" / "iter_0000002")
    (resumed / "ckpt" / "latest").write_text("iter_0000002\n")
    (resumed / "ckpt" / "iter_0000004.tmp").mkdir()
    (resumed / "ckpt" / "iter_0000004.tmp" / "garbage.distcp").write_bytes(b"\0" * 10)
    assert latest_checkpoint(resumed / "ckpt").name == "iter_0000002"
    run_local(_sft, 1, _overrides(synthetic_data_dir, resumed))
    again = _losses(resumed)
    assert sorted(again) == [3, 4]  # steps 1-2 were not redone
    for step in (3, 4):
        assert again[step] == pytest.approx(reference[step], abs=1e-6)
    assert latest_checkpoint(resumed / "ckpt").name == "iter_0000004"


def test_tp2_checkpoint_loads_at_tp1_and_latest_is_kept_on_crash(synthetic_data_dir, tmp_path):
    run_dir = tmp_path / "tp2"
    run_local(_sft, 2, _overrides(synthetic_data_dir, run_dir,
                                  "parallel.tensor_model_parallel_size=2"))  # fmt: skip
    ckpt = latest_checkpoint(run_dir / "ckpt")
    tp2, _ = run_local(_weights, 2, ckpt, 2)[0]
    tp1, fresh = run_local(_weights, 1, ckpt, 1)[0]
    assert tp1.keys() == tp2.keys()
    # The load replaced the fresh initialisation (training moved every matrix).
    assert all(not torch.equal(tp1[n], fresh[n]) for n in tp1 if n.endswith("linear_qkv.weight"))
    for name in tp1:
        torch.testing.assert_close(tp1[name], tp2[name], rtol=0, atol=0)
    # Losses fell over the run.
    losses = _losses(run_dir)
    assert losses[4] < losses[1]


def test_dangling_latest_pointer_is_a_clear_error(tmp_path):
    (tmp_path / "latest").write_text("iter_0000009\n")
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        latest_checkpoint(tmp_path)
    assert os.listdir(tmp_path) == ["latest"]
