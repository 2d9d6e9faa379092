"""The pinned reference run: a fixed-seed tiny SFT, then DAPO + LongAct, on 2 gloo ranks (DP=2).

Its loss, grad-norm, lr and reward trajectories are committed in ``trajectory.json``; a refactor
must reproduce them bit for bit on CPU (torchtitan's habit: integration runs compare against
committed reference losses). A change that is *meant* to move the numbers re-pins them with

    LONGACT_PIN_REFERENCE=1 python -m pytest tests/reference

and says why in its commit message.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from megatron_longact.runtime.launch import run_local

TRAJECTORY = Path(__file__).with_name("trajectory.json")
# Wall-clock figures differ run to run; everything else in metrics.jsonl is pinned.
UNPINNED_PREFIXES = ("perf/", "train/tokens_per_s", "longact/select_ms")

COMMON = ["model.preset=micro-qwen3", "logging.progress=false", "train.seed=1234"]


def _job(overrides: list[str], command: str) -> None:
    from megatron_longact.config import JobConfig, load_config
    from megatron_longact.rl.loop import run_rl
    from megatron_longact.sft.loop import run_sft

    job = load_config(JobConfig, None, overrides)
    (run_sft if command == "sft" else run_rl)(job)


def _trajectory(metrics_file: Path) -> list[dict[str, float]]:
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith(UNPINNED_PREFIXES)} for row in rows]


def _run_reference(data_dir: Path, out: Path) -> dict[str, list[dict[str, float]]]:
    run_local(_job, 2, [
        *COMMON, f"data.train_path={data_dir / 'sft_train.jsonl'}",
        "data.seq_length=256", "data.micro_batch_size=2", "data.global_batch_size=8",
        "optim.lr=3e-3", "optim.min_lr=3e-4", "optim.warmup_steps=2", "train.train_steps=150",
        f"checkpoint.save_dir={out / 'sft'}", f"logging.tensorboard_dir={out / 'sft_tb'}",
    ], "sft")  # fmt: skip
    run_local(_job, 2, [
        *COMMON, f"data.train_path={data_dir / 'rl_train.jsonl'}",
        f"checkpoint.load_dir={out / 'sft'}", f"checkpoint.save_dir={out / 'rl'}",
        f"logging.tensorboard_dir={out / 'rl_tb'}",
        "optim.lr=1e-3", "optim.min_lr=1e-3", "optim.warmup_steps=0", "train.train_steps=3",
        "data.micro_batch_size=4", "rl.prompts_per_step=4", "rl.rollouts_per_prompt=4",
        "rl.max_new_tokens=64", "rl.max_seq_length=256", "rl.dynamic_sampling=false",
        "longact.strategy=massive", "longact.ratio=0.3",
    ], "rl")  # fmt: skip
    return {
        "sft": _trajectory(out / "sft_tb" / "metrics.jsonl"),
        "rl": _trajectory(out / "rl_tb" / "metrics.jsonl"),
    }


def test_reference_run_is_bit_for_bit(synthetic_data_dir, tmp_path):
    got = _run_reference(synthetic_data_dir, tmp_path)
    assert len(got["sft"]) == 150 and len(got["rl"]) == 3, got
    if os.environ.get("LONGACT_PIN_REFERENCE") == "1":
        TRAJECTORY.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"re-pinned {TRAJECTORY}")
    want = json.loads(TRAJECTORY.read_text())
    for stage in ("sft", "rl"):
        for step, (g, w) in enumerate(zip(got[stage], want[stage], strict=True), start=1):
            # JSON keeps a float's repr, so == is bitwise equality of the doubles.
            diff = {k: (g.get(k), w.get(k)) for k in w.keys() | g.keys() if g.get(k) != w.get(k)}
            assert not diff, f"{stage} step {step} left the pinned trajectory: {diff}"
