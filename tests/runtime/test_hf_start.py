"""The cluster path's weight flow on CPU, in fp32 and in bf16 (Float16Module + fp32 masters):
Hugging Face folder -> SFT -> RL -> Hugging Face folder, the weights carried at every hand-over.

An HF folder saved by transformers (random non-trivial weights, several shards) starts SFT at
TP=2 (``model.init`` auto: the folder's weights, streamed through the ``longact convert``
mapping). At lr=0 nothing may move, so every later stage must see exactly the input weights
(bf16-rounded in bf16): SFT's export; RL after one step from the SFT checkpoint (weights only,
TP=1 x DP=2); SFT restarted from the TP=2 checkpoint at TP=1 (reshard: fresh optimizer). In
bf16 each of these fails without the optimizer's master refresh after the load (the
distributed optimizer's fp32 masters hold the construction-time random weights). A small lr
must move weights by at most one Adam step; freeze mode must keep its masked rows bitwise.

Two gloo worlds per precision, several runs each: slow (about 1.5 minutes per precision).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_longact.config.schema import OptimConfig
from megatron_longact.runtime.launch import run_local

pytestmark = pytest.mark.slow

SMALL_LR = 1e-3
FREEZE_LR = 1e-2
FREEZE_STEPS = 3
BF16_EPS = 2.0**-8  # half a bf16 ulp, relative: what rounding a moved master can add
FP32_LOSS_TOL = 1e-5
BF16_LOSS_TOL = 3e-2  # relative: bf16 activations against transformers' fp32 forward


def _common(data: Path, run: Path, *, hf_dir: Path, precision: str, steps: int, lr: float):
    return [
        f"model.hf_path={hf_dir}",
        f"data.tokenizer_path={hf_dir}",
        f"train.precision={precision}",
        f"train.train_steps={steps}",
        f"optim.lr={lr}",
        f"optim.min_lr={lr}",
        "optim.lr_decay_style=constant",
        "optim.warmup_steps=0",
        f"checkpoint.save_dir={run / 'ckpt'}",
        f"logging.tensorboard_dir={run / 'tb'}",
        "logging.progress=false",
    ]


def sft_overrides(data: Path, run: Path, **kwargs) -> list[str]:
    return [
        *_common(data, run, **kwargs),
        f"data.train_path={data / 'sft_train.jsonl'}",
        "data.seq_length=256",
        "data.micro_batch_size=2",
        "data.global_batch_size=4",
    ]


def rl_overrides(data: Path, run: Path, **kwargs) -> list[str]:
    return [
        *_common(data, run, **kwargs),
        f"data.train_path={data / 'rl_train.jsonl'}",
        "data.micro_batch_size=4",
        "rl.prompts_per_step=2",
        "rl.rollouts_per_prompt=4",
        "rl.max_new_tokens=16",
        "rl.max_seq_length=512",
        "rl.dynamic_sampling=false",
    ]


def run_stages(stages: list[tuple[str, list[str]]]) -> None:
    """Per rank: runs ``longact sft|rl`` with each override list in turn (one world)."""
    from megatron_longact.config import JobConfig, load_config
    from megatron_longact.rl.loop import run_rl
    from megatron_longact.sft.loop import run_sft

    for kind, overrides in stages:
        job = load_config(JobConfig, None, overrides)
        (run_sft if kind == "sft" else run_rl)(job)


def export(run: Path, hf_dir: Path) -> dict[str, torch.Tensor]:
    from tiny_hf import load_hf_tensors

    from megatron_longact.convert.mcore_to_hf import export_checkpoint

    out = run / "hf"
    export_checkpoint(load=run / "ckpt", out_dir=out, hf_dir=hf_dir, show_progress=False)
    return load_hf_tensors(out)


def first_loss(run: Path) -> float:
    first = json.loads((run / "tb" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1
    return first["train/loss"]


def _max_excess(moved: torch.Tensor, base: torch.Tensor, *, lr: float, bf16: bool) -> float:
    """Largest amount by which |moved - base| exceeds one AdamW step at ``lr``: the Adam
    update (at most lr at step 1, |m / sqrt(v)| <= 1), decoupled weight decay lr * wd * |w|
    and, in bf16, the rounding of the moved master to the model weight."""
    relative = lr * OptimConfig().weight_decay + (BF16_EPS if bf16 else 0.0)
    slack = 1.01 * lr + base.float().abs() * relative
    return float(((moved.float() - base.float()).abs() - slack).max())


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory) -> Path:
    from tiny_hf import save_tiny_hf_model

    return save_tiny_hf_model(tmp_path_factory.mktemp("hf") / "tiny-qwen3", seed=3)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_weights_flow_hf_sft_rl_hf(precision, hf_model, synthetic_data_dir, tmp_path):
    from tiny_hf import load_hf_tensors, transformers_sft_loss

    from megatron_longact.config import JobConfig, load_config

    bf16 = precision == "bf16"
    data, kw = synthetic_data_dir, dict(hf_dir=hf_model, precision=precision)
    sft = sft_overrides(data, tmp_path / "sft", steps=2, lr=0.0, **kw)
    run_local(run_stages, 2, [("sft", [*sft, "parallel.tensor_model_parallel_size=2"])])
    sft_ckpt = f"checkpoint.load_dir={tmp_path / 'sft' / 'ckpt'}"
    stages = [
        ("rl", [*rl_overrides(data, tmp_path / "rl0", steps=1, lr=0.0, **kw), sft_ckpt]),
        ("rl", [*rl_overrides(data, tmp_path / "rl_small", steps=1, lr=SMALL_LR, **kw), sft_ckpt]),
        # The TP=2 run continued at TP=1 (its step 2 -> 3): reshard, fresh optimizer.
        ("sft", [*sft_overrides(data, tmp_path / "reshard", steps=3, lr=0.0, **kw), sft_ckpt,
                 "checkpoint.load_weights_only=false"]),
        ("sft", [*sft_overrides(data, tmp_path / "reshard_small", steps=3, lr=SMALL_LR, **kw),
                 sft_ckpt, "checkpoint.load_weights_only=false"]),
    ]  # fmt: skip
    if bf16:
        freeze = [
            *rl_overrides(data, tmp_path / "freeze", steps=FREEZE_STEPS, lr=FREEZE_LR, **kw),
            sft_ckpt,
            "longact.mode=freeze",
            "longact.schedule=every_n_steps",
            f"longact.every_n_steps={FREEZE_STEPS + 1}",  # one mask for every step
        ]
        stages.append(("rl", freeze))
    run_local(run_stages, 2, stages)

    source = load_hf_tensors(hf_model)
    expected = {k: v.to(torch.bfloat16) if bf16 else v for k, v in source.items()}
    for run in ("sft", "rl0", "reshard"):
        exported = export(tmp_path / run, hf_model)
        assert sorted(exported) == sorted(expected), run
        for name, tensor in expected.items():
            assert exported[name].dtype == tensor.dtype, (run, name)
            assert torch.equal(exported[name], tensor), f"{run}: {name} moved at lr=0"

    # One AdamW step moves an element by at most lr (+ decay, rounding). The random
    # model's rollouts mostly tie on reward (zero advantages), so the RL step may not move
    # anything; the resharded SFT step has real gradients and must move weights.
    for run, must_move in (("rl_small", False), ("reshard_small", True)):
        small = export(tmp_path / run, hf_model)
        excess = {n: _max_excess(small[n], t, lr=SMALL_LR, bf16=bf16)
                  for n, t in expected.items()}  # fmt: skip
        assert max(excess.values()) <= 0, (run, sorted(excess.items(), key=lambda kv: -kv[1])[:3])
        if must_move:
            assert any(not torch.equal(small[n], t) for n, t in expected.items()), run

    reference = transformers_sft_loss(hf_model, load_config(JobConfig, None, sft))
    loss = first_loss(tmp_path / "sft")
    if bf16:
        assert loss == pytest.approx(reference, rel=BF16_LOSS_TOL)
    else:
        assert loss == pytest.approx(reference, abs=FP32_LOSS_TOL)

    if bf16:
        _check_freeze(tmp_path / "freeze", hf_model, expected)


def _check_freeze(run: Path, hf_dir: Path, expected: dict[str, torch.Tensor]) -> None:
    """Rows LongAct masked stay bitwise at the loaded (SFT = HF) values over every step."""
    from megatron.core import dist_checkpointing

    from megatron_longact.checkpoint import latest_checkpoint

    exported = export(run, hf_dir)
    common = dist_checkpointing.load_common_state_dict(str(latest_checkpoint(run / "ckpt")))
    masks = common["extra"]["longact"]["masks"]
    assert masks, "no LongAct masks in the RL checkpoint"
    frozen_rows = trained_rows = 0
    for layer, per_projection in masks.items():
        for projection, trains in per_projection.items():  # bool [heads, D], True = trains
            name = f"model.layers.{layer}.self_attn.{projection}_proj.weight"
            rows = trains.reshape(-1)
            moved, base = exported[name], expected[name]
            assert torch.equal(moved[~rows], base[~rows]), f"{name}: a frozen row moved"
            frozen_rows += int((~rows).sum())
            trained_rows += int((moved[rows] != base[rows]).any(dim=1).sum())
    assert frozen_rows > 0 and trained_rows > 0, (frozen_rows, trained_rows)
