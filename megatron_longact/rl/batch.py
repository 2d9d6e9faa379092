"""Training micro-batches from scored samples: which samples go together, and their layout.

What goes where (:func:`plan_step`) depends only on the samples' unpadded lengths, the DP size
and the config: never on TP, CP or PP, so a step's data is the same at every model-parallel
layout (the issue's "layout-invariant data": RL packs by unpadded length and pads afterwards).
The layout of one micro-batch (:class:`RowLayout`) is then either

packed (``rl.packing``, the default): the micro-batch's sequences concatenated in one row
    [1, T], each padded only to ``sequence_multiple`` (2 x CP under context parallel, for the
    zig-zag split) and the row to ``row_multiple``; ``cu_seqlens`` marks the (padded) sequences
    plus a trailing padding segment. Attention sees THD ``packed_seq_params`` (TE, the local
    CP attention, or megatron's local kernel per segment at CP=1: ``models.cp_attention``);
    ``RowLayout.thd=False`` gives a dense [T, T] block-causal mask instead (tests only).
padded: one sequence per row [b, L], right-padded to the step's longest sequence.

Per row, for prompt p (length P) and response r (length R)::

    tokens         p0 .. p{P-1} r0 .. r{R-1} pad ..
    labels         tokens shifted left by one inside the sequence (pad after its end)
    response_mask  1 where the *label* is a response token: positions P-1 .. P+R-2
    token_mask     1 on the P + R real tokens (saliency excludes padding)
    sequence_ids   index of the sequence in the micro-batch on its real tokens, -1 elsewhere
    seq_tokens     [n]: each sequence's response tokens (whole sequence: CP slices [b, s] only)

Padding needs no attention mask of its own: under the causal (block-causal) mask real tokens
never see the pads that follow them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from megatron_longact.data.packing import block_causal_mask
from megatron_longact.errors import UserError
from megatron_longact.rl.experience import Sample
from megatron_longact.runtime.batches import (
    balanced_partition,
    contiguous_partition,
    extend_groups,
    partition_imbalance,
    token_budget_groups,
)

logger = logging.getLogger(__name__)

SEQ_MULTIPLE = 8  # row lengths are multiples of this (tensor-core friendly, CP-splittable)


# ---------------------------------------------------------------------------------------------
# Which samples go together


@dataclass(frozen=True, kw_only=True)
class StepPlan:
    """Sample indices of one RL step: ``updates[u][rank][m]`` are those of micro-batch ``m``
    of DP rank ``rank`` in optimizer update ``u``. Every rank of an update has the same number
    of micro-batches (some possibly empty). Identical on every rank (a pure function)."""

    updates: list[list[list[list[int]]]]
    imbalance: float
    """DP load imbalance, max over updates of (heaviest rank / mean rank) - 1 in the balance
    cost (tokens, or squared lengths); 0 is perfect."""
    num_oversize: int
    """Sequences longer than the micro-batch token budget (each ran in a micro-batch alone)."""

    def mine(self, dp_rank: int) -> list[list[list[int]]]:
        """This rank's ``[update][micro-batch] -> sample indices``."""
        return [update[dp_rank] for update in self.updates]


def sample_length(sample: Sample) -> int:
    return len(sample.prompt_ids) + len(sample.response_ids)


def plan_step(
    lengths: list[int],
    *,
    dp: int,
    num_minibatches: int = 1,
    micro_batch_size: int = 1,
    max_tokens_per_microbatch: int = 0,
    balance: str = "tokens",
) -> StepPlan:
    """Splits a step's samples (unpadded ``lengths``, in the step's order) into updates, DP
    ranks and micro-batches; drops nothing.

    1. Updates: ``num_minibatches`` consecutive runs of samples (sizes differ by <= 1).
    2. DP ranks: ``balance`` "tokens" (sum of lengths) or "attention" (sum of squared
       lengths, causal attention's cost) balanced by :func:`balanced_partition`; "none" is
       consecutive runs (the layout before balancing).
    3. Micro-batches per rank: groups of at most ``max_tokens_per_microbatch`` real tokens
       when > 0 (a longer sequence alone, counted in ``num_oversize``), else
       ``micro_batch_size`` consecutive samples; then every rank is brought to the largest
       count of the update (:func:`extend_groups`: splits, then empty micro-batches).
    """
    costs = {"tokens": lambda n: float(n), "attention": lambda n: float(n) ** 2}
    if balance not in (*costs, "none"):
        raise UserError(f"rl.dp_balance={balance!r}; choose tokens, attention or none")
    updates, imbalance, oversize = [], 0.0, 0
    runs = contiguous_partition(len(lengths), parts=num_minibatches)
    for run in [r for r in runs if r]:  # a partial batch may leave an update without samples
        run_lengths = [lengths[i] for i in run]
        if balance == "none":
            sets = contiguous_partition(len(run), parts=dp)
            cost = [float(n) for n in run_lengths]
        else:
            cost = [costs[balance](n) for n in run_lengths]
            sets = balanced_partition(cost, parts=dp)
        imbalance = max(imbalance, partition_imbalance(cost, sets))
        per_rank = []
        for members in sets:
            if max_tokens_per_microbatch > 0:
                local = token_budget_groups([run_lengths[i] for i in members],
                                            max_tokens=max_tokens_per_microbatch)  # fmt: skip
                groups = [[members[j] for j in g] for g in local]
                oversize += sum(run_lengths[i] > max_tokens_per_microbatch for i in members)
            else:
                groups = [members[i : i + micro_batch_size]
                          for i in range(0, len(members), micro_batch_size)]  # fmt: skip
            per_rank.append(groups)
        count = max(1, max(len(g) for g in per_rank))
        per_rank = [extend_groups(g, count=count, lengths=run_lengths) for g in per_rank]
        updates.append([[[run[i] for i in g] for g in groups] for groups in per_rank])
    return StepPlan(updates=updates, imbalance=imbalance, num_oversize=oversize)


# ---------------------------------------------------------------------------------------------
# How one micro-batch is laid out


@dataclass(frozen=True, kw_only=True)
class RowLayout:
    """The layout-dependent part of a micro-batch (padding only; the data never changes)."""

    packed: bool
    """One packed row per micro-batch (THD boundaries) instead of one padded row per sample."""
    thd: bool = False
    """Packed rows go to attention as THD ``packed_seq_params`` (what ``rl.step`` uses);
    False: a dense block-causal mask, [T, T] bool per row (kept to test THD against)."""
    sequence_multiple: int = 1
    """Every packed sequence is padded to a multiple of it (2 x CP under context parallel)."""
    row_multiple: int = SEQ_MULTIPLE
    """Row lengths are multiples of it (SEQ_MULTIPLE x CP, x TP with sequence parallel)."""


def row_layout(*, packed: bool, thd: bool, cp: int, tp: int, sequence_parallel: bool) -> RowLayout:
    """The layout for a parallel configuration: sequences padded to 2 x CP (the zig-zag split
    cuts each into 2 x CP chunks), rows to a multiple of SEQ_MULTIPLE x CP and, with sequence
    parallel, of CP x TP (each CP rank's share is scattered over TP)."""
    row = SEQ_MULTIPLE * cp
    if sequence_parallel:
        row = math.lcm(row, cp * tp)
    return RowLayout(packed=packed, thd=thd, sequence_multiple=2 * cp if cp > 1 else 1,
                     row_multiple=row)  # fmt: skip


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def packed_length(samples: list[Sample], layout: RowLayout) -> int:
    """Tokens of the packed row of ``samples`` under ``layout`` (at least one multiple)."""
    total = sum(_round_up(sample_length(s), layout.sequence_multiple) for s in samples)
    return max(_round_up(total, layout.row_multiple), layout.row_multiple)


def padded_length(samples: list[Sample], *, multiple: int = SEQ_MULTIPLE) -> int:
    """The common row length L of padded rows: the longest sample, rounded up."""
    longest = max((sample_length(s) for s in samples), default=0)
    return max(_round_up(longest, multiple), multiple)


def _fill(fields, row, start, sample, index, *, overlong_filter):
    """Writes ``sample`` at ``[row, start:]`` of the [b, L] ``fields``."""
    prompt, response = len(sample.prompt_ids), len(sample.response_ids)
    end = start + prompt + response
    ids = torch.tensor(sample.prompt_ids + sample.response_ids, dtype=torch.long)
    fields["tokens"][row, start:end] = ids
    fields["labels"][row, start : end - 1] = ids[1:]
    fields["position_ids"][row, start:end] = torch.arange(end - start)
    fields["token_mask"][row, start:end] = 1.0
    fields["sequence_ids"][row, start:end] = index
    if response and not (overlong_filter and sample.truncated):
        fields["response_mask"][row, start + prompt - 1 : end - 1] = 1.0
    fields["advantages"][row, start:end] = sample.advantage
    engine = torch.tensor(sample.engine_logprobs, dtype=torch.float32)
    fields["engine_logp"][row, start + prompt - 1 : start + prompt - 1 + engine.numel()] = engine


def _empty_fields(rows: int, length: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    return {
        "tokens": torch.full((rows, length), pad_token_id, dtype=torch.long),
        "labels": torch.full((rows, length), pad_token_id, dtype=torch.long),
        "position_ids": torch.zeros(rows, length, dtype=torch.long),
        "response_mask": torch.zeros(rows, length),
        "token_mask": torch.zeros(rows, length),
        "advantages": torch.zeros(rows, length),
        "engine_logp": torch.zeros(rows, length),
        "sequence_ids": torch.full((rows, length), -1, dtype=torch.long),
    }


def make_rows(
    samples: list[Sample],
    *,
    length: int,
    pad_token_id: int,
    overlong_filter: bool = False,
    rows: int = 1,
) -> dict[str, torch.Tensor]:
    """Padded layout: one sample per row, [b, L], b = max(len(samples), ``rows``); the extra
    rows are all padding and contribute nothing (an empty micro-batch is one such row).
    ``overlong_filter`` zeroes the response mask of truncated responses."""
    fields = _empty_fields(max(len(samples), rows), length, pad_token_id)
    for row, sample in enumerate(samples):
        _fill(fields, row, 0, sample, row, overlong_filter=overlong_filter)
    fields["advantages"] *= fields["response_mask"]
    fields["seq_tokens"] = fields["response_mask"].sum(dim=1)[: len(samples)]
    return fields


def pack_rows(
    samples: list[Sample],
    *,
    layout: RowLayout,
    pad_token_id: int,
    length: int | None = None,
    overlong_filter: bool = False,
) -> dict[str, torch.Tensor]:
    """Packed layout: ``samples`` concatenated in one row [1, T], T = ``length`` or
    :func:`packed_length`. Adds ``cu_seqlens`` [n + 2] int32 (padded sequence boundaries, then
    the trailing padding segment; [0, T] only when nothing pads) and, without THD, the
    block-causal ``attention_mask`` [1, 1, T, T] bool (True = masked)."""
    total = packed_length(samples, layout) if length is None else length
    fields = _empty_fields(1, total, pad_token_id)
    boundaries, start = [0], 0
    for index, sample in enumerate(samples):
        _fill(fields, 0, start, sample, index, overlong_filter=overlong_filter)
        start += _round_up(sample_length(sample), layout.sequence_multiple)
        boundaries.append(start)
    if start > total:
        raise ValueError(f"{start} packed tokens do not fit a row of {total}")
    if start < total:
        fields["position_ids"][0, start:] = torch.arange(total - start)
        boundaries.append(total)
    fields["advantages"] *= fields["response_mask"]
    ids = fields["sequence_ids"][0]
    mask = fields["response_mask"][0]
    fields["seq_tokens"] = torch.stack([mask[ids == i].sum() for i in range(len(samples))]) \
        if samples else torch.zeros(0)  # fmt: skip
    fields["cu_seqlens"] = torch.tensor(boundaries, dtype=torch.int32)
    if not layout.thd:
        fields["attention_mask"] = block_causal_mask(fields["cu_seqlens"], total)[None]
    return fields


def build_micro_batches(
    samples: list[Sample],
    groups: list[list[int]],
    *,
    layout: RowLayout,
    pad_token_id: int,
    overlong_filter: bool,
    padded_to: int,
    same_length: bool,
) -> list[dict[str, torch.Tensor]]:
    """Micro-batches for ``groups`` of sample indices. Padded: rows of ``padded_to`` tokens
    (the step's longest, so every rank and update agrees). Packed: one row per group. With
    ``same_length`` (pipeline parallel sends one activation shape per schedule) all packed
    rows take the longest one's length and padded micro-batches the largest row count."""
    if not layout.packed:
        rows = max(1, *(len(g) for g in groups)) if same_length else 1
        return [make_rows([samples[i] for i in g], length=padded_to, pad_token_id=pad_token_id,
                          overlong_filter=overlong_filter, rows=rows) for g in groups]  # fmt: skip
    chosen = [[samples[i] for i in g] for g in groups]
    common = max(packed_length(c, layout) for c in chosen) if same_length else None
    return [pack_rows(c, layout=layout, pad_token_id=pad_token_id, length=common,
                      overlong_filter=overlong_filter) for c in chosen]  # fmt: skip


def padding_fraction(micro_batches: list[dict[str, torch.Tensor]]) -> float:
    """Share of the rows' tokens that are padding (layout padding, not data)."""
    total = sum(b["tokens"].numel() for b in micro_batches)
    real = sum(float(b["token_mask"].sum()) for b in micro_batches)
    return 1.0 - real / max(total, 1)


def split_rows(rows: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive chunks of ``size`` rows of [b, ...] ``rows`` (micro-batches)."""
    total = rows["tokens"].shape[0]
    return [{k: v[i : i + size] for k, v in rows.items()} for i in range(0, total, size)]
