"""Which tokens a context-parallel rank holds: megatron's load-balanced zig-zag layout.

Every sequence (a dense row, or one segment of a packed THD row, padded to a multiple of
``2 * CP``) is cut into ``2 * CP`` equal chunks and rank ``r`` holds chunks ``r`` and
``2 * CP - 1 - r``, in that order, so causal work is balanced. This is the layout of
megatron's ``get_batch_on_this_cp_rank`` (``megatron/core/utils.py`` ~1994-2036), of RoPE's
``get_pos_emb_on_this_cp_rank`` and ``_get_thd_freqs_on_this_cp_rank``
(``models/common/embeddings/rope_utils.py`` ~48, ~129) and of Transformer Engine's
``thd_get_partitioned_indices`` (used by ``get_thd_batch_on_this_cp_rank``, ``utils.py``
~2039-2078). One function here computes it for everything of ours: batch slicing, the CP
attention's global positions, LongAct's sample ids.
"""

from __future__ import annotations

import torch


def check_boundaries(boundaries: torch.Tensor, *, cp_size: int, where: str = "cu_seqlens") -> None:
    """Raises ValueError unless every segment of ``boundaries`` is a multiple of 2 x CP."""
    lengths = boundaries[1:] - boundaries[:-1]
    if int(boundaries[0]) != 0 or bool((lengths < 0).any()):
        raise ValueError(f"{where} must start at 0 and not decrease, got {boundaries.tolist()}")
    if bool((lengths % (2 * cp_size)).any()):
        raise ValueError(
            f"{where} {boundaries.tolist()} has segments that are not multiples of 2 x "
            f"context_parallel_size ({2 * cp_size}); pad every sample to a multiple of it "
            "(sft.data.pad_to_multiple, or cu_seqlens_padded)"
        )


def cp_token_index(boundaries: torch.Tensor, *, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Global positions of the tokens rank ``cp_rank`` holds, in its local order.

    Args:
        boundaries: int [n + 1], segment starts over the whole (flattened) sequence, from 0 to
            its length ``T``; a dense row of ``S`` tokens is ``[0, S]``. Every segment must be
            a multiple of ``2 * cp_size`` tokens.
        cp_size, cp_rank: the context-parallel group size and this rank in it.

    Returns:
        int64 [T / cp_size]: for each segment in order, the positions of its chunk ``cp_rank``
        then of its chunk ``2 * cp_size - 1 - cp_rank``.
    """
    boundaries = boundaries.to(torch.int64).flatten()
    if cp_size == 1:
        return torch.arange(int(boundaries[-1]), device=boundaries.device)
    check_boundaries(boundaries, cp_size=cp_size)
    starts, lengths = boundaries[:-1], boundaries[1:] - boundaries[:-1]
    chunk = lengths // (2 * cp_size)  # [n]
    local = 2 * chunk  # tokens of each segment on this rank
    # Position inside the local share of each segment, then which of the two chunks it is in.
    segment = torch.repeat_interleave(torch.arange(starts.numel(), device=starts.device), local)
    offset = torch.arange(int(local.sum()), device=starts.device) - torch.repeat_interleave(
        local.cumsum(0) - local, local
    )
    seg_chunk = chunk[segment]
    second = offset >= seg_chunk
    chunk_id = torch.where(second, 2 * cp_size - 1 - cp_rank, cp_rank)
    return starts[segment] + chunk_id * seg_chunk + offset - second * seg_chunk


def cp_gather_order(boundaries: torch.Tensor, *, cp_size: int) -> torch.Tensor:
    """Global positions of the tokens of an all-gather over the CP group (ranks concatenated
    in rank order): int64 [T]. ``argsort`` of it puts gathered tokens back in global order."""
    return torch.cat(
        [cp_token_index(boundaries, cp_size=cp_size, cp_rank=r) for r in range(cp_size)]
    )
