"""Per-token log-probs of training rows under a model, via megatron's forward-only schedule."""

from __future__ import annotations

import torch

from megatron_longact.rl.forward import logprob_forward_step
from megatron_longact.runtime.train_step import forward_only


def compute_logprobs(
    model: list,
    micro_batches: list[dict[str, torch.Tensor]],
    *,
    temperature: float,
    chunk_tokens: int = 0,
) -> list[torch.Tensor | None]:
    """Log-probs per micro-batch, shaped like its ``tokens`` ([b, L] padded, [1, T] packed),
    on the last pipeline stage (None elsewhere); computed over ``chunk_tokens`` chunks.

    All ranks of the model replica must call it with the same micro-batches (collective).
    Under pipeline parallel every micro-batch must have the same shape (``rl.batch``).
    """
    from megatron.core import parallel_state

    reports = forward_only(model, forward_step_func=logprob_forward_step(temperature,
                                                                    chunk_tokens=chunk_tokens),
                           data_iterator=iter(micro_batches),
                           num_microbatches=len(micro_batches),
                           seq_length=micro_batches[0]["tokens"].shape[1],
                           micro_batch_size=micro_batches[0]["tokens"].shape[0])  # fmt: skip
    if not parallel_state.is_pipeline_last_stage():
        return [None] * len(micro_batches)
    return [r["logp"] for r in reports]
