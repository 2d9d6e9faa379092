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


def check_virtual_pipeline_microbatches(num_microbatches: int, *, pp: int, vpp: int) -> None:
    """Raises UserError unless megatron's interleaved schedule accepts ``num_microbatches``
    per DP rank at PP x VPP (no-op for VPP 1). It runs micro-batches in groups of
    ``microbatch_group_size_per_vp_stage`` (default PP, ``model_parallel_config.py`` ~447) per
    chunk and refuses fewer than one group or a last group smaller than PP
    (``pipeline_parallel/schedules.py`` ~986-1004, megatron-core 0.16.1): with groups of PP,
    the count must be a positive multiple of PP."""
    if vpp > 1 and (num_microbatches < pp or num_microbatches % pp):
        raise UserError(
            f"{num_microbatches} micro-batches per step (data.global_batch_size / "
            f"(data.micro_batch_size x data-parallel size)) with "
            f"parallel.virtual_pipeline_model_parallel_size={vpp}: the interleaved schedule "
            f"needs a multiple of parallel.pipeline_model_parallel_size={pp}; change "
            "data.global_batch_size or data.micro_batch_size"
        )


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


def contiguous_partition(num_items: int, *, parts: int) -> list[list[int]]:
    """Items ``0..n-1`` in ``parts`` consecutive runs whose sizes differ by at most one (the
    first ``n % parts`` runs one longer): nothing is dropped when ``parts`` does not divide."""
    base, extra = divmod(num_items, parts)
    out, start = [], 0
    for part in range(parts):
        size = base + (part < extra)
        out.append(list(range(start, start + size)))
        start += size
    return out


def balanced_partition(costs: Sequence[float], *, parts: int) -> list[list[int]]:
    """Indices of ``costs`` in ``parts`` sets of nearly equal total cost, deterministically.

    Longest-processing-time first: items by decreasing cost (ties by index) each go to the set
    with the smallest total so far (ties by set index). When an item lands on the set that
    ends up heaviest, that set was the lightest, so max - min total <= the largest cost (the
    guarantee verl's ``seqlen_balancing`` and NeMo-RL's dynamic batching aim at too). A pure
    function of ``costs``: every rank computes the same sets, and a resumed step too. Indices
    within a set are ascending (the step's order).
    """
    totals = [0.0] * parts
    sets: list[list[int]] = [[] for _ in range(parts)]
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        target = min(range(parts), key=lambda p: (totals[p], p))
        sets[target].append(index)
        totals[target] += costs[index]
    return [sorted(s) for s in sets]


def partition_imbalance(costs: Sequence[float], sets: Sequence[Sequence[int]]) -> float:
    """max over sets of its total cost / mean total - 1 (0 = perfectly balanced)."""
    totals = [sum(costs[i] for i in s) for s in sets]
    mean = sum(totals) / max(len(totals), 1)
    return max(totals) / mean - 1.0 if mean > 0 else 0.0


def token_budget_groups(lengths: Sequence[int], *, max_tokens: int) -> list[list[int]]:
    """Indices of ``lengths`` in groups of at most ``max_tokens`` tokens (first-fit
    decreasing, ties by index; indices ascending within a group). An item longer than the
    budget forms a group of its own (the caller logs it): it cannot be split."""
    groups: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for g, free in enumerate(room):
            if lengths[index] <= free:
                groups[g].append(index)
                room[g] -= lengths[index]
                break
        else:
            groups.append([index])
            room.append(max_tokens - lengths[index])
    return [sorted(g) for g in groups]


def extend_groups(
    groups: list[list[int]], *, count: int, lengths: Sequence[int]
) -> list[list[int]]:
    """``groups`` grown to ``count`` groups: the group with the most tokens (of those with two
    or more items; ties by position) is split in two halves by item count until ``count`` is
    reached, then empty groups fill the rest. Splitting never exceeds a token budget the
    groups met. Used so every DP rank runs the same number of micro-batches."""
    groups = [list(g) for g in groups]
    while len(groups) < count:
        splittable = [i for i, g in enumerate(groups) if len(g) > 1]
        if not splittable:
            groups.extend([] for _ in range(count - len(groups)))
            break
        heaviest = max(splittable, key=lambda i: (sum(lengths[j] for j in groups[i]), -i))
        items = groups[heaviest]
        half = (len(items) + 1) // 2
        groups[heaviest : heaviest + 1] = [items[:half], items[half:]]
    return groups
