"""Forward steps for megatron's schedules: language-model loss on a token batch.

A batch is a dict of tensors on every pipeline stage (stages ignore what they do not need):
``tokens`` [b, s] int64, ``labels`` [b, s] int64, ``loss_mask`` [b, s] float32,
``position_ids`` [b, s] int64, optional ``attention_mask`` [b, 1, s, s] bool (True = masked
out; block-causal for packed bins) and optional ``cu_seqlens`` [n+1] int32 (THD packing with TE).
"""

from __future__ import annotations

from functools import partial

import torch

from megatron_longact.runtime.context_parallel import cp_size, slice_dense_batch, slice_thd_batch
from megatron_longact.runtime.train_step import masked_sum_loss


def device_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Moves a batch to this rank's device (CUDA when present)."""
    if not torch.cuda.is_available():
        return batch
    return {k: v.cuda(non_blocking=True) for k, v in batch.items()}


def packed_seq_params(cu_seqlens: torch.Tensor, max_seqlen: int):
    """megatron ``PackedSeqParams`` for THD attention (Transformer Engine only)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = cu_seqlens.to(torch.int32)
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=max_seqlen,
        max_seqlen_kv=max_seqlen,
    )


def lm_forward_step(data_iterator, model):
    """``forward_step_func`` for next-token cross-entropy on ``loss_mask``-ed tokens.

    Returns the model's per-token loss [b, s] (fp32, vocab-parallel CE) and the loss function
    that reduces it to (sum, count, report); see :mod:`runtime.train_step` for the contract.
    """
    batch = device_batch(next(data_iterator))
    kwargs = {}
    if "attention_mask" not in batch and "cu_seqlens" in batch:
        # THD: TE takes the micro-batch as one [1, b*s] token stream cut by cu_seqlens.
        batch = {k: (v.reshape(1, -1) if v.dim() == 2 else v) for k, v in batch.items()}
        if cp_size() > 1:
            batch, kwargs["packed_seq_params"] = slice_thd_batch(batch)
        else:
            kwargs["packed_seq_params"] = packed_seq_params(
                batch["cu_seqlens"], int(batch.get("max_seqlen", batch["tokens"].shape[1]))
            )
    else:
        batch = slice_dense_batch(batch)
    output = model(
        input_ids=batch["tokens"],
        position_ids=batch["position_ids"],
        attention_mask=batch.get("attention_mask"),
        labels=batch["labels"],
        **kwargs,
    )
    return output, partial(masked_sum_loss, batch["loss_mask"])
