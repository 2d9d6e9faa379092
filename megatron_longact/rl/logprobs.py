"""Per-token log-probs of training rows under a model, via megatron's forward-only schedule."""

from __future__ import annotations

import torch

from megatron_longact.rl.forward import logprob_forward_step
from megatron_longact.runtime.train_step import forward_only


def compute_logprobs(
    model: list, micro_batches: list[dict[str, torch.Tensor]], *, temperature: float
) -> list[torch.Tensor | None]:
    """[b, L] log-probs per micro-batch on the last pipeline stage (None elsewhere).

    All ranks of the model replica must call it with the same micro-batches (collective).
    """
    from megatron.core import parallel_state

    reports = forward_only(model, forward_step_func=logprob_forward_step(temperature),
                           data_iterator=iter(micro_batches),
                           num_microbatches=len(micro_batches),
                           seq_length=micro_batches[0]["tokens"].shape[1],
                           micro_batch_size=micro_batches[0]["tokens"].shape[0])  # fmt: skip
    if not parallel_state.is_pipeline_last_stage():
        return [None] * len(micro_batches)
    return [r["logp"] for r in reports]
