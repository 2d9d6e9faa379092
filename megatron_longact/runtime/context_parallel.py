"""Context parallel: this rank's share of a batch's sequence dimension.

megatron's ring attention expects every CP rank to hold chunks ``r`` and ``2*CP-1-r`` of each
sequence cut into ``2*CP`` chunks (balanced causal work). Dense rows ([b, s] tensors) are cut
with megatron's ``get_batch_on_this_cp_rank``; packed THD rows with
``get_thd_batch_on_this_cp_rank``, which needs every sample padded to a multiple of ``2*CP``
(``sft.data`` pads them). Fields that are not [b, s] (``cu_seqlens``, ``max_seqlen``) stay whole.
"""

from __future__ import annotations

import torch


def cp_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_context_parallel_world_size()


def cp_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_context_parallel_rank()


def slice_dense_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This CP rank's chunks of every [b, s] tensor (and of an [b, 1, s, s] mask's queries).

    ``s`` must be divisible by ``2*CP``. A no-op without context parallel.
    """
    size = cp_size()
    if size == 1:
        return batch
    from megatron.core.utils import get_batch_on_this_cp_rank

    seq = batch["tokens"].shape[1]
    if seq % (2 * size):
        raise ValueError(f"sequence length {seq} is not divisible by 2 x context_parallel_size")
    rows = {k: v for k, v in batch.items() if v.dim() >= 2 and v.shape[1] == seq or
            k == "attention_mask"}  # fmt: skip
    sliced = get_batch_on_this_cp_rank(dict(rows))
    return {**batch, **sliced}


def slice_thd_batch(batch: dict[str, torch.Tensor]):
    """This CP rank's tokens of a THD batch ([1, T] rows with ``cu_seqlens`` whose segments are
    multiples of ``2*CP``); returns (batch, PackedSeqParams). Transformer Engine >= 1.10."""
    from megatron.core.utils import get_thd_batch_on_this_cp_rank

    cu = batch["cu_seqlens"].to(torch.int32)
    rows = {k: v for k, v in batch.items() if k not in ("cu_seqlens", "max_seqlen")}
    rows, params = get_thd_batch_on_this_cp_rank(rows, cu, cu, batch["max_seqlen"].view(1))
    return {**batch, **rows}, params


def gather_dense_sequence(local: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`slice_dense_batch` for a [b, s/CP, ...] tensor: the full [b, s, ...]
    on every CP rank (all-gather over the CP group). A no-op without context parallel."""
    size = cp_size()
    if size == 1:
        return local
    import torch.distributed as dist
    from megatron.core import parallel_state

    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local.contiguous(), group=parallel_state.get_context_parallel_group())
    chunks: list[torch.Tensor | None] = [None] * (2 * size)
    for rank, part in enumerate(parts):
        first, second = part.chunk(2, dim=1)
        chunks[rank], chunks[2 * size - 1 - rank] = first, second
    return torch.cat(chunks, dim=1)  # type: ignore[arg-type]
