"""Helpers of the MoE tests: a tiny Qwen3-MoE saved by transformers, transformers' reference
logits, and the functions the spawned gloo worlds run (each world batches several checks: a
spawn costs ~10 s on 2 cores).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

PRESET = "micro-qwen3-moe"
BATCH, SEQ = 2, 16
LOGITS_ATOL = 1e-5  # fp32
STEPS = 3
GLOBAL_BATCH = 4
TRAIN_SEQ = 32


@dataclass(frozen=True)
class TinyMoE:
    """A saved tiny Qwen3-MoE: folder, test tokens [b, s], transformers' logits [b, s, V]."""

    hf_dir: Path
    tokens: torch.Tensor
    logits: torch.Tensor


def save_tiny_moe(folder: Path, *, seed: int = 0) -> TinyMoE:
    """``micro-qwen3-moe`` (8 experts, top-2, norm_topk_prob) with random non-trivial weights,
    saved by transformers' ``save_pretrained`` (Hub layout: one tensor per expert)."""
    from tiny_hf import save_tiny_hf_model
    from transformers import AutoModelForCausalLM

    save_tiny_hf_model(folder, seed=seed, preset_name=PRESET)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    )
    tokens = torch.randint(0, 1024, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logits = model(input_ids=tokens).logits
    return TinyMoE(hf_dir=folder, tokens=tokens, logits=logits)


def hf_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    from tiny_hf import load_hf_tensors

    return load_hf_tensors(folder)


def import_and_forward(*, hf_dir: str, out_dir: str, ep: int, tokens: torch.Tensor) -> dict:
    """Per rank: import at EP=``ep`` (TP=1), reload the checkpoint into a fresh chunk built at
    the same layout and return the full logits [b, s, V] and the checkpoint path."""
    from megatron_longact.checkpoint.dist_ckpt import load_checkpoint
    from megatron_longact.config.schema import ModelConfig, ParallelConfig, TrainConfig
    from megatron_longact.convert.hf_import import import_hf_checkpoint
    from megatron_longact.models.gpt import build_gpt_model, make_transformer_config
    from megatron_longact.models.hf_config import parse_hf_config, read_hf_config

    ckpt = import_hf_checkpoint(hf_dir=hf_dir, out_dir=out_dir, ep=ep, show_progress=False)
    arch = parse_hf_config(read_hf_config(hf_dir))
    model_cfg = ModelConfig(hf_path=hf_dir)
    tconfig = make_transformer_config(
        arch,
        model=model_cfg,
        parallel=ParallelConfig(expert_model_parallel_size=ep),
        train=TrainConfig(precision="fp32"),
    )
    gpt = build_gpt_model(arch, tconfig, model=model_cfg)
    load_checkpoint(ckpt.parent, model=[gpt], weights_only=True)
    gpt.eval()
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        logits = gpt(input_ids=tokens, position_ids=positions, attention_mask=None)
    experts = [n for n, _ in gpt.named_parameters() if "local_experts" in n and "layers.0." in n]
    return {"ckpt": str(ckpt), "logits": logits, "local_expert_params": len(experts)}


def _global_batch(step: int, vocab: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(100 + step)
    samples = []
    for _ in range(GLOBAL_BATCH):
        tokens = torch.randint(0, vocab, (TRAIN_SEQ,), generator=gen)
        samples.append(
            {
                "tokens": tokens,
                "labels": torch.roll(tokens, -1),
                "loss_mask": (torch.rand(TRAIN_SEQ, generator=gen) > 0.3).float(),
                "position_ids": torch.arange(TRAIN_SEQ),
            }
        )
    return samples


def _micro_batches(samples, *, dp_rank: int, dp: int, mbs: int):
    per_rank = len(samples) // dp
    mine = samples[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    return [
        {k: torch.stack([s[k] for s in mine[i : i + mbs]]) for k in mine[0]}
        for i in range(0, per_rank, mbs)
    ]


def train_steps(hf_dir: str, overrides: list[str], *, mbs: int = 1) -> dict:
    """Per rank: ``STEPS`` SFT steps from the HF weights at the layout ``overrides`` gives;
    returns [(loss, grad norm, load-balancing loss)] per step (the grad norm covers every
    gradient after the DP and expert-DP reduces; ``main_grad`` itself is sharded differently
    per layout by the distributed optimizer, so it is not compared)."""
    from megatron_longact.config import JobConfig, load_config
    from megatron_longact.runtime.distributed import init_distributed
    from megatron_longact.runtime.forward import lm_forward_step
    from megatron_longact.runtime.setup import load_start_weights, setup_train_state
    from megatron_longact.runtime.train_step import train_step

    job = load_config(
        JobConfig,
        None,
        [
            f"model.hf_path={hf_dir}",
            "train.precision=fp32",
            "optim.lr=1e-3",
            "optim.warmup_steps=0",
            f"train.train_steps={STEPS}",
            *overrides,
        ],
    )
    dims = init_distributed(job.parallel, seed=job.train.seed)
    state = setup_train_state(job, dims)
    load_start_weights(job, state)
    steps = []
    for step in range(STEPS):
        micro = _micro_batches(
            _global_batch(step, state.arch.vocab_size), dp_rank=dims.dp_rank, dp=dims.dp, mbs=mbs
        )
        result = train_step(
            state,
            forward_step_func=lm_forward_step,
            data_iterator=iter(micro),
            num_microbatches=len(micro),
            seq_length=TRAIN_SEQ,
            micro_batch_size=mbs,
        )
        steps.append((result.loss, result.grad_norm, result.extras.get("moe/load_balancing_loss")))
    return {"steps": steps, "ep": dims.ep, "tp": dims.tp}
