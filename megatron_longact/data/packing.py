"""Sequence packing: variable-length samples into fixed-length bins, with THD boundaries.

Layout of one bin of ``S = seq_length`` tokens holding samples ``a`` (length 3) and ``b``
(length 2), padded by 2::

    tokens        a0 a1 a2 b0 b1 p  p
    labels        a1 a2 P  b1 P  P  P      P = pad_token_id (never a target)
    loss_mask     m1 m2 0  n1 0  0  0      m/n: the sample's loss_mask of the *label* token
    position_ids  0  1  2  0  1  0  1      restart per segment
    cu_seqlens    [0, 3, 5, 7]             padding is a trailing segment of its own

Labels are next-token targets inside a sample only, so no loss ever crosses a boundary.
Attention must not cross one either: on GPU pass ``cu_seqlens`` to TE as THD
``PackedSeqParams``; on CPU (megatron's local attention cannot take packed params) use
:func:`block_causal_mask`. Padding attends only to itself, so no softmax row is empty.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_longact.data.chat import TokenizedSample
from megatron_longact.errors import UserError


@dataclass
class PackedBin:
    """One packed row of ``S`` tokens. Shapes: ``[S]`` except ``cu_seqlens``."""

    tokens: torch.Tensor  # [S] int64
    labels: torch.Tensor  # [S] int64, next token within the sample, pad_token_id elsewhere
    loss_mask: torch.Tensor  # [S] float32, loss_mask of the label token; 0 at sample ends/pad
    position_ids: torch.Tensor  # [S] int64, restart at 0 per segment
    cu_seqlens: torch.Tensor  # [num_segments + 1] int32, segments = samples (+ 1 if padded)
    sample_indices: list[int]  # indices of the packed samples in the input, in row order

    @property
    def num_samples(self) -> int:
        return len(self.sample_indices)

    @property
    def seq_length(self) -> int:
        return self.tokens.numel()


def first_fit_decreasing(lengths: Sequence[int], *, capacity: int) -> list[list[int]]:
    """Assign items to bins of ``capacity`` by first-fit decreasing; return index lists.

    Items are visited longest first (ties by index, so the result is deterministic without a
    seed) and each goes into the first open bin with room. Indices within a bin are sorted
    ascending. Bins come out roughly longest-first: shuffle them in the sampler. O(n * bins).

    Raises:
        ValueError: an item is longer than ``capacity``.
    """
    for index, length in enumerate(lengths):
        if length > capacity:
            raise UserError(
                f"sample {index} has {length} tokens, more than seq_length={capacity}; raise "
                f"seq_length or drop samples longer than it (max_length <= seq_length)."
            )
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for index in order:
        for b, free in enumerate(room):
            if lengths[index] <= free:
                bins[b].append(index)
                room[b] -= lengths[index]
                break
        else:
            bins.append([index])
            room.append(capacity - lengths[index])
    return [sorted(b) for b in bins]


def fill_bin(
    samples: Sequence[TokenizedSample], *, seq_length: int, pad_token_id: int = 0
) -> PackedBin:
    """Lay ``samples`` out in order in one row of ``seq_length`` tokens, right-padded.

    ``sample_indices`` is ``0..len(samples)-1``; :func:`pack_samples` rewrites it. The pad id
    only has to be a valid token id: padding is never a target and never attended across.
    """
    total = sum(s.num_tokens for s in samples)
    if total > seq_length:
        raise ValueError(f"samples hold {total} tokens, more than seq_length={seq_length}.")
    tokens = torch.full((seq_length,), pad_token_id, dtype=torch.int64)
    labels = torch.full((seq_length,), pad_token_id, dtype=torch.int64)
    loss_mask = torch.zeros(seq_length, dtype=torch.float32)
    position_ids = torch.zeros(seq_length, dtype=torch.int64)
    boundaries = [0]
    start = 0
    for sample in samples:
        n = sample.num_tokens
        ids = torch.tensor(sample.input_ids, dtype=torch.int64)
        tokens[start : start + n] = ids
        # Position i predicts token i+1 of the same sample; the last token predicts nothing.
        labels[start : start + n - 1] = ids[1:]
        loss_mask[start : start + n - 1] = torch.tensor(sample.loss_mask[1:], dtype=torch.float32)
        position_ids[start : start + n] = torch.arange(n)
        start += n
        boundaries.append(start)
    if start < seq_length:
        position_ids[start:] = torch.arange(seq_length - start)
        boundaries.append(seq_length)
    return PackedBin(
        tokens=tokens,
        labels=labels,
        loss_mask=loss_mask,
        position_ids=position_ids,
        cu_seqlens=torch.tensor(boundaries, dtype=torch.int32),
        sample_indices=list(range(len(samples))),
    )


def pack_samples(
    samples: Sequence[TokenizedSample], *, seq_length: int, pad_token_id: int = 0
) -> list[PackedBin]:
    """Pack samples into bins of ``seq_length`` tokens by :func:`first_fit_decreasing`."""
    bins = []
    for indices in first_fit_decreasing([s.num_tokens for s in samples], capacity=seq_length):
        packed = fill_bin(
            [samples[i] for i in indices], seq_length=seq_length, pad_token_id=pad_token_id
        )
        packed.sample_indices = indices
        bins.append(packed)
    return bins


def block_causal_mask(cu_seqlens: torch.Tensor, seq_length: int) -> torch.Tensor:
    """Attention mask for one packed row, megatron convention: True = masked out.

    Position ``q`` may attend to ``k`` only when ``k <= q`` and both lie in the same
    ``[cu_seqlens[j], cu_seqlens[j+1])`` segment.

    Args:
        cu_seqlens: ``[num_segments + 1]`` int, from 0 to ``seq_length``.
        seq_length: ``S``.

    Returns:
        ``[1, S, S]`` bool; ``S * S`` bytes, so keep it to CPU-sized ``S``.
    """
    if cu_seqlens[0] != 0 or cu_seqlens[-1] != seq_length:
        raise ValueError(
            f"cu_seqlens must run from 0 to seq_length={seq_length}, got "
            f"{cu_seqlens.tolist()}; include the padding segment."
        )
    segment_lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    segment_ids = torch.repeat_interleave(torch.arange(segment_lengths.numel()), segment_lengths)
    same_segment = segment_ids[:, None] == segment_ids[None, :]
    causal = torch.ones(seq_length, seq_length, dtype=torch.bool).tril()
    return ~(same_segment & causal).unsqueeze(0)


def collate(
    bins: Sequence[PackedBin], *, with_attention_mask: bool = True
) -> dict[str, torch.Tensor]:
    """Stack bins into a micro-batch.

    Returns:
        ``tokens``, ``labels``, ``position_ids``: ``[B, S]`` int64; ``loss_mask``: ``[B, S]``
        float32; ``attention_mask``: ``[B, 1, S, S]`` bool, True = masked out (only with
        ``with_attention_mask``); ``cu_seqlens``: ``[total_segments + 1]`` int32 over the
        flattened ``B * S`` tokens (row ``b`` offset by ``b * S``), the THD layout TE takes;
        ``max_seqlen``: 0-d int32, the longest segment.
    """
    if not bins:
        raise ValueError("collate needs at least one bin.")
    seq_length = bins[0].seq_length
    if any(b.seq_length != seq_length for b in bins):
        raise ValueError(f"bins differ in length: {[b.seq_length for b in bins]}.")
    offsets = [b.cu_seqlens[:-1] + row * seq_length for row, b in enumerate(bins)]
    cu_seqlens = torch.cat([*offsets, torch.tensor([len(bins) * seq_length])]).to(torch.int32)
    batch = {
        "tokens": torch.stack([b.tokens for b in bins]),
        "labels": torch.stack([b.labels for b in bins]),
        "loss_mask": torch.stack([b.loss_mask for b in bins]),
        "position_ids": torch.stack([b.position_ids for b in bins]),
        "cu_seqlens": cu_seqlens,
        "max_seqlen": (cu_seqlens[1:] - cu_seqlens[:-1]).max().to(torch.int32),
    }
    if with_attention_mask:
        batch["attention_mask"] = torch.stack(
            [block_causal_mask(b.cu_seqlens, seq_length) for b in bins]
        )
    return batch


def unpacked_batch(
    samples: Sequence[TokenizedSample],
    seq_length: int,
    *,
    pad_token_id: int = 0,
    with_attention_mask: bool = True,
) -> dict[str, torch.Tensor]:
    """One sample per row, right-padded to ``seq_length``: the same fields as
    :func:`collate`, for checking packed against unpacked computation."""
    return collate(
        [fill_bin([s], seq_length=seq_length, pad_token_id=pad_token_id) for s in samples],
        with_attention_mask=with_attention_mask,
    )
