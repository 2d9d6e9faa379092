"""Supervised fine-tuning (the paper's cold start, section 3.2): one readable loop."""

from __future__ import annotations

import logging
import time

from megatron_longact.checkpoint import preflight
from megatron_longact.config.schema import JobConfig, check_sequence_length
from megatron_longact.models.gpt import use_transformer_engine
from megatron_longact.runtime.batches import (
    global_batch_indices,
    num_microbatches,
    shard_microbatches,
)
from megatron_longact.runtime.distributed import init_distributed
from megatron_longact.runtime.forward import lm_forward_step
from megatron_longact.runtime.metrics import MetricsWriter, Progress, tensorboard_dir
from megatron_longact.runtime.save_point import save_point
from megatron_longact.runtime.setup import load_start_weights, setup_train_state
from megatron_longact.runtime.signals import StopRequest
from megatron_longact.runtime.train_step import eval_step, train_step
from megatron_longact.sft.data import bin_collate, load_sft_data

logger = logging.getLogger(__name__)


def run_sft(job: JobConfig, *, config_yaml: str = "") -> dict[str, float]:
    """Trains ``job.train.train_steps`` SFT steps; returns the last step's metrics.

    Resumes from ``checkpoint.save_dir`` when it holds a checkpoint. All ranks run it.
    """
    dims = init_distributed(job.parallel, seed=job.train.seed)
    data = load_sft_data(job.data, pad_multiple=2 * dims.cp if dims.cp > 1 else 1)
    state = setup_train_state(job, dims)
    check_sequence_length(seq_length=job.data.seq_length, field="data.seq_length",
                          max_position_embeddings=job.model.max_position_embeddings
                          or state.arch.max_position_embeddings)  # fmt: skip
    if len(data.tokenizer) > state.arch.vocab_size:
        raise ValueError(
            f"tokenizer has {len(data.tokenizer)} tokens but the model's vocab_size is "
            f"{state.arch.vocab_size}; use a matching tokenizer (data.tokenizer_path)"
        )
    ckpt = job.checkpoint
    loaded = load_start_weights(job, state)
    if loaded is not None and loaded.progress:
        state.progress.update(loaded.progress)
    collate = bin_collate(use_thd=use_transformer_engine(job.model))
    micro = num_microbatches(
        global_batch_size=job.data.global_batch_size,
        micro_batch_size=job.data.micro_batch_size,
        dp=dims.dp,
    )

    def batches(bins, consumed: int):
        order = global_batch_indices(
            len(bins),
            batch_size=job.data.global_batch_size,
            consumed=consumed,
            seed=job.train.seed,
            shuffle=job.data.shuffle,
        )
        return shard_microbatches(
            [bins[i] for i in order],
            dp_rank=dims.dp_rank,
            dp=dims.dp,
            micro_batch_size=job.data.micro_batch_size,
            collate=collate,
        )

    step_kwargs = dict(
        forward_step_func=lm_forward_step,
        num_microbatches=micro,
        seq_length=job.data.seq_length,
        micro_batch_size=job.data.micro_batch_size,
    )
    preflight(save_dir=ckpt.save_dir, other_dirs={"logging.tensorboard_dir": tensorboard_dir(job)},
              model=state.model, with_optimizer=True)  # fmt: skip
    writer = MetricsWriter(tensorboard_dir(job), wandb_project=job.logging.wandb_project)
    metrics: dict[str, float] = {}
    start = state.progress["step"]
    stop = StopRequest()
    with Progress(
        job.train.train_steps, description="sft", enabled=job.logging.progress, start=start
    ) as bar:
        for step in range(start + 1, job.train.train_steps + 1):
            tic = time.perf_counter()
            micro_batches = batches(data.train_bins, state.progress["consumed_samples"])
            result = train_step(state, data_iterator=iter(micro_batches), **step_kwargs)
            state.progress["step"] = step
            state.progress["consumed_samples"] += job.data.global_batch_size
            elapsed = time.perf_counter() - tic
            # Tokens processed (padding included) by all DP ranks this step.
            tokens = job.data.global_batch_size * job.data.seq_length
            metrics = {
                "train/loss": result.loss,
                "train/lr": result.lr,
                "train/grad_norm": result.grad_norm,
                "train/tokens_per_s": tokens / elapsed,
                "train/loss_tokens": result.num_tokens,
                **{f"train/{k}": v for k, v in result.extras.items()},  # MoE aux loss
            }
            if job.train.eval_interval and data.val_bins and step % job.train.eval_interval == 0:
                # The same first eval_batches global batches of the validation set every time.
                val = [
                    mb
                    for i in range(job.train.eval_batches)
                    for mb in batches(data.val_bins, i * job.data.global_batch_size)
                ]
                metrics["val/loss"], _ = eval_step(
                    state, data_iterator=iter(val), **{**step_kwargs, "num_microbatches": len(val)}
                )
            if step % job.train.log_interval == 0:
                writer.log(metrics, step=step)
            bar.update(info=f"loss {result.loss:.4f} lr {result.lr:.2e}")
            if save_point(state, ckpt, stop, step=step, last_step=job.train.train_steps,
                          config_yaml=config_yaml):  # fmt: skip
                break
    writer.close()
    return metrics
