"""Global-batch order, data-parallel shards and micro-batches.

The order is a pure function of (seed, samples consumed), so a resumed run reads exactly the
batches the uninterrupted run would have read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from megatron_longact.errors import UserError


def global_batch_indices(
    num_items: int, *, batch_size: int, consumed: int, seed: int, shuffle: bool = True
) -> list[int]:
    """Indices of the next ``batch_size`` items after ``consumed`` items have been read.

    Epoch ``e`` visits a permutation drawn with ``seed + e``; batches run across epoch ends.
    """
    if num_items == 0:
        raise UserError("the dataset is empty; check data.train_path")
    indices = []
    position = consumed
    while len(indices) < batch_size:
        epoch, offset = divmod(position, num_items)
        if shuffle:
            order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed + epoch))
        else:
            order = torch.arange(num_items)
        take = min(batch_size - len(indices), num_items - offset)
        indices.extend(order[offset : offset + take].tolist())
        position += take
    return indices


def num_microbatches(*, global_batch_size: int, micro_batch_size: int, dp: int) -> int:
    """Micro-batches per DP rank; raises ValueError naming the fields when not whole."""
    if global_batch_size % (micro_batch_size * dp):
        raise UserError(
            f"data.global_batch_size={global_batch_size} must be divisible by "
            f"data.micro_batch_size={micro_batch_size} x data-parallel size {dp}"
        )
    return global_batch_size // (micro_batch_size * dp)


def shard_microbatches(
    items: Sequence[Any],
    *,
    dp_rank: int,
    dp: int,
    micro_batch_size: int,
    collate: Callable[[Sequence[Any]], dict[str, torch.Tensor]],
) -> list[dict[str, torch.Tensor]]:
    """This DP rank's contiguous share of a global batch, collated per micro-batch."""
    per_rank = len(items) // dp
    mine = items[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    return [collate(mine[i : i + micro_batch_size]) for i in range(0, per_rank, micro_batch_size)]
