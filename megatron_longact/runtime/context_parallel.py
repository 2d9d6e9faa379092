"""Context parallel: this rank's share of a batch's sequence dimension.

Every CP rank holds chunks ``r`` and ``2*CP-1-r`` of each sequence cut into ``2*CP`` chunks
(balanced causal work; :mod:`models.cp_layout`). Dense rows ([b, s] tensors) are cut with
megatron's ``get_batch_on_this_cp_rank``; packed THD rows per segment by
:func:`slice_thd_batch`, which needs every sample padded to a multiple of ``2*CP``
(``sft.data`` and ``rl.batch`` pad them). Fields that are not [b, s] (``cu_seqlens``,
``max_seqlen``, RL's per-sequence ``seq_tokens``) stay whole; :func:`gather_sequence` puts a
per-token result back together on every CP rank. The attention that consumes these layouts is TE's (GPU) or
:mod:`models.cp_attention` (local spec).
"""

from __future__ import annotations

import torch

from megatron_longact.models.cp_layout import check_boundaries, cp_token_index

THD_METADATA = ("cu_seqlens", "cu_seqlens_padded", "max_seqlen")
"""Batch fields of a THD micro-batch that describe the whole packed row (never sliced)."""


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


def thd_packed_seq_params(batch: dict[str, torch.Tensor]):
    """megatron ``PackedSeqParams`` (qkv_format thd) for a [1, T] packed micro-batch.

    ``cu_seqlens`` [n + 1] int are the sample boundaries over the T tokens; the optional
    ``cu_seqlens_padded`` are the boundaries the tokens are laid out on (what CP splits and
    RoPE restarts on), by default the same. ``max_seqlen`` is the longest padded segment.
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = batch["cu_seqlens"].to(torch.int32).flatten()
    padded = batch.get("cu_seqlens_padded", cu).to(torch.int32).flatten()
    max_seqlen = int((padded[1:] - padded[:-1]).max())
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        cu_seqlens_q_padded=padded,
        cu_seqlens_kv_padded=padded,
        max_seqlen_q=max_seqlen,
        max_seqlen_kv=max_seqlen,
    )


def slice_thd_batch(batch: dict[str, torch.Tensor]):
    """This CP rank's tokens of a THD batch ([1, T] rows with ``cu_seqlens`` whose padded
    segments are multiples of ``2*CP``); returns (batch, PackedSeqParams).

    Per segment, chunks ``r`` and ``2*CP-1-r``: the layout TE's ``thd_get_partitioned_indices``
    gives (``megatron/core/utils.py`` ~2069), computed here without TE so the local CP
    attention runs on CPU too.
    """
    params = thd_packed_seq_params(batch)
    size = cp_size()
    if size == 1:
        return batch, params
    padded = params.cu_seqlens_q_padded
    check_boundaries(padded, cp_size=size, where="cu_seqlens_padded")
    total = batch["tokens"].shape[1]
    if int(padded[-1]) != total:
        raise ValueError(f"cu_seqlens end at {int(padded[-1])}, the packed row has {total}")
    index = cp_token_index(padded, cp_size=size, cp_rank=cp_rank()).to(batch["tokens"].device)
    rows = {
        k: v.index_select(1, index)
        for k, v in batch.items()
        if k not in THD_METADATA and v.dim() >= 2 and v.shape[1] == total
    }
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


def gather_thd_sequence(local: torch.Tensor, params) -> torch.Tensor:
    """Inverse of :func:`slice_thd_batch` for a [1, T/CP, ...] tensor: the full [1, T, ...] in
    packed order on every CP rank (all-gather over the CP group). ``params`` is the batch's
    THD ``PackedSeqParams``. A no-op without context parallel."""
    size = cp_size()
    if size == 1:
        return local
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_longact.models.cp_layout import cp_gather_order

    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local.contiguous(), group=parallel_state.get_context_parallel_group())
    order = cp_gather_order(params.cu_seqlens_q_padded, cp_size=size).to(local.device)
    whole = torch.empty_like(torch.cat(parts, dim=1))
    whole[:, order] = torch.cat(parts, dim=1)
    return whole


def gather_sequence(local: torch.Tensor, params) -> torch.Tensor:
    """This CP rank's part of a per-token tensor back to the whole micro-batch on every CP
    rank: THD (``params`` a ``PackedSeqParams``) or dense rows (``params`` None)."""
    if params is None:
        return gather_dense_sequence(local)
    return gather_thd_sequence(local, params)
