"""Forward steps for megatron's schedules: language-model loss on a token batch.

A batch is a dict of tensors on every pipeline stage (stages ignore what they do not need):
``tokens`` [b, s] int64, ``labels`` [b, s] int64, ``loss_mask`` [b, s] float32,
``position_ids`` [b, s] int64, optional ``attention_mask`` [b, 1, s, s] bool (True = masked
out; block-causal for packed bins) and optional ``cu_seqlens`` [n+1] int32 over the flattened
b * s tokens (THD packing: TE on GPU, :mod:`models.cp_attention` under CP on the local spec).
"""

from __future__ import annotations

from functools import partial

import torch

from megatron_longact.device import on_cuda
from megatron_longact.runtime.context_parallel import slice_dense_batch, slice_thd_batch
from megatron_longact.runtime.train_step import masked_sum_loss


def device_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Moves a batch to this rank's device (CUDA when present)."""
    if not on_cuda():
        return batch
    return {k: v.cuda(non_blocking=True) for k, v in batch.items()}


def uses_thd(batch: dict[str, torch.Tensor]) -> bool:
    """A packed batch without a dense mask goes to attention as THD (``packed_seq_params``)."""
    return "attention_mask" not in batch and "cu_seqlens" in batch


def model_batch(batch: dict[str, torch.Tensor]):
    """This rank's part of a micro-batch, laid out as the model takes it.

    The one place that decides the layout: the forward steps and LongAct's meter (which must
    see the same tokens as the ``linear_qkv`` hooks) both go through :func:`local_rows` with
    :func:`uses_thd`. Returns ``(batch, PackedSeqParams or None)``; no collectives.
    """
    return local_rows(batch, thd=uses_thd(batch))


def local_rows(batch: dict[str, torch.Tensor], *, thd: bool):
    """THD: every [b, s] field flattened to [1, b*s], then this CP rank's per-segment chunks;
    returns ``(batch, PackedSeqParams)``. Otherwise this CP rank's zig-zag chunks of every
    [b, s] field (and of the mask's query dim): ``(batch, None)``."""
    if thd:
        flat = {k: (v.reshape(1, -1) if v.dim() == 2 else v) for k, v in batch.items()}
        return slice_thd_batch(flat)
    return slice_dense_batch(batch), None


def lm_forward_step(data_iterator, model):
    """``forward_step_func`` for next-token cross-entropy on ``loss_mask``-ed tokens.

    Returns the model's per-token loss [b, s] (fp32, vocab-parallel CE) and the loss function
    that reduces it to (sum, count, report); see :mod:`runtime.train_step` for the contract.
    """
    batch, params = model_batch(device_batch(next(data_iterator)))
    kwargs = {} if params is None else {"packed_seq_params": params}
    output = model(
        input_ids=batch["tokens"],
        position_ids=batch["position_ids"],
        attention_mask=batch.get("attention_mask"),
        labels=batch["labels"],
        **kwargs,
    )
    return output, partial(masked_sum_loss, batch["loss_mask"])
