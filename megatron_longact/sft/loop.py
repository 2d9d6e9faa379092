"""Supervised fine-tuning (the paper's cold start, section 3.2): setup, one step, validation.

:func:`run_sft` hands :func:`sft_step` to the loop skeleton both loops share
(``runtime.loop.run_loop``: logging, progress, save point, stop requests).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Any

from megatron_longact.config.schema import JobConfig, check_sequence_length
from megatron_longact.errors import UserError
from megatron_longact.models.gpt import use_transformer_engine
from megatron_longact.runtime.batches import (
    check_virtual_pipeline_microbatches,
    global_batch_indices,
    num_microbatches,
    shard_microbatches,
)
from megatron_longact.runtime.distributed import init_distributed
from megatron_longact.runtime.forward import lm_forward_step
from megatron_longact.runtime.loop import Every, Metrics, run_loop
from megatron_longact.runtime.setup import TrainState, load_start_weights, setup_train_state
from megatron_longact.runtime.train_step import eval_step, train_step
from megatron_longact.sft.data import bin_collate, load_sft_data


@dataclass(kw_only=True)
class SFTRun:
    """What an SFT run sets up once and every step uses."""

    job: JobConfig
    state: TrainState
    data: Any  # sft.data.SFTData: packed train/validation bins and the tokenizer
    collate: Any
    """Packed bins -> one micro-batch dict (THD layout with Transformer Engine)."""
    num_microbatches: int
    """Micro-batches per DP rank per step (global / (micro x DP))."""


def setup_sft(job: JobConfig) -> SFTRun:
    """Distributed init, data, model and optimizer, start weights (resume / load / HF). All
    ranks call it."""
    dims = init_distributed(job.parallel, seed=job.train.seed)
    micro = num_microbatches(global_batch_size=job.data.global_batch_size,
                             micro_batch_size=job.data.micro_batch_size, dp=dims.dp)  # fmt: skip
    check_virtual_pipeline_microbatches(micro, pp=dims.pp, vpp=dims.vpp)
    data = load_sft_data(job.data, pad_multiple=2 * dims.cp if dims.cp > 1 else 1)
    state = setup_train_state(job, dims)
    check_sequence_length(seq_length=job.data.seq_length, field="data.seq_length",
                          max_position_embeddings=job.model.max_position_embeddings
                          or state.arch.max_position_embeddings)  # fmt: skip
    if len(data.tokenizer) > state.arch.vocab_size:
        raise UserError(
            f"tokenizer has {len(data.tokenizer)} tokens but the model's vocab_size is "
            f"{state.arch.vocab_size}; use a matching tokenizer (data.tokenizer_path)"
        )
    load_start_weights(job, state)
    return SFTRun(job=job, state=state, data=data, num_microbatches=micro,
                  collate=bin_collate(use_thd=use_transformer_engine(job.model)))  # fmt: skip


def _micro_batches(run: SFTRun, bins, consumed: int) -> list[dict]:
    """This DP rank's micro-batches of the global batch that starts after ``consumed`` samples
    of the seeded epoch order of ``bins``."""
    job, dims = run.job, run.state.dims
    order = global_batch_indices(len(bins), batch_size=job.data.global_batch_size,
                                 consumed=consumed, seed=job.train.seed,
                                 shuffle=job.data.shuffle)  # fmt: skip
    return shard_microbatches([bins[i] for i in order], dp_rank=dims.dp_rank, dp=dims.dp,
                              micro_batch_size=job.data.micro_batch_size,
                              collate=run.collate)  # fmt: skip


def _step_kwargs(run: SFTRun, num_microbatches: int) -> dict:
    return dict(forward_step_func=lm_forward_step, num_microbatches=num_microbatches,
                seq_length=run.job.data.seq_length,
                micro_batch_size=run.job.data.micro_batch_size)  # fmt: skip


def sft_step(run: SFTRun, step: int) -> Metrics:
    """SFT step ``step``: the next global batch, one optimizer update. All ranks call it."""
    job, progress = run.job, run.state.progress
    tic = time.perf_counter()
    micro_batches = _micro_batches(run, run.data.train_bins, progress.consumed_samples)
    result = train_step(run.state, data_iterator=iter(micro_batches),
                        **_step_kwargs(run, run.num_microbatches))  # fmt: skip
    progress.consumed_samples += job.data.global_batch_size
    elapsed = time.perf_counter() - tic
    # Tokens processed (padding included) by all DP ranks this step.
    tokens = job.data.global_batch_size * job.data.seq_length
    return {
        "train/loss": result.loss,
        "train/lr": result.lr,
        "train/grad_norm": result.grad_norm,
        "train/tokens_per_s": tokens / elapsed,
        "train/loss_tokens": result.num_tokens,
        **{f"train/{k}": v for k, v in result.extras.items()},  # MoE aux loss
    }


def validate(run: SFTRun, step: int) -> Metrics:
    """Validation loss on the same first ``train.eval_batches`` global batches of the
    validation set every time. All ranks call it."""
    job = run.job
    val = [mb for i in range(job.train.eval_batches)
           for mb in _micro_batches(run, run.data.val_bins, i * job.data.global_batch_size)]  # fmt: skip
    loss, _ = eval_step(run.state, data_iterator=iter(val), **_step_kwargs(run, len(val)))
    return {"val/loss": loss}


def run_sft(job: JobConfig, *, config_yaml: str = "") -> Metrics:
    """Trains ``job.train.train_steps`` SFT steps; returns the last step's metrics.

    Resumes from ``checkpoint.save_dir`` when it holds a checkpoint. All ranks run it.
    """
    run = setup_sft(job)
    evaluate = Every(job.train.eval_interval if run.data.val_bins else 0, partial(validate, run))
    return run_loop(job, run.state, partial(sft_step, run), name="sft", every=[evaluate],
                    describe=lambda m: f"loss {m['train/loss']:.4f} lr {m['train/lr']:.2e}",
                    config_yaml=config_yaml)  # fmt: skip
