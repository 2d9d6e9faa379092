"""Eq. 2: per-(head, dim) activation magnitude M, accumulated over a global batch.

    M[h, d] = 1/B * sum_i sqrt( sum_{s in sample i} Q_i[s, h, d]^2 )

measured on the output of ``linear_qkv`` (before QK-norm and RoPE). Everything here works on
*rows* of that output (see :mod:`layout`): one running sum per layer of length ``R`` (this TP
rank's rows), never per-token state.

Per micro-batch: square the activations once, sum the squares per sample (vectorised: a
masked sum over the sequence for padded rows, one ``index_add_`` over segment ids for packed
bins), take the square root per sample and add it to the layer's running sum. Context
parallel splits every sample over the CP ranks, so there the per-sample sums of squares (and
token counts) of a micro-batch are all-reduced over the CP group before the square root; that
is one collective per micro-batch for all layers together, done when the next micro-batch
starts or at the end of the step. At the end of the step the running sums and the sample count
are all-reduced over data parallel and the rows all-gathered over tensor parallel.

A sample counts iff it has at least one real token: a ``token_mask`` [b, s] in the batch (1 =
real token) excludes padding rows and the padding segment of a packed bin. Without a
``token_mask`` every token and every segment counts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

HOOK_CHUNK_BYTES = 64 * 2**20
"""Largest fp32 temporary the hook allocates (bounds LongAct's peak-memory overhead)."""


@dataclass(frozen=True, kw_only=True)
class MicroBatchSamples:
    """Which sample each local token of one micro-batch belongs to.

    Token order is the ``[s, b]`` order of megatron's activations (sequence first), so the
    hook can flatten its output without a copy.
    """

    num_samples: int
    """Rows of the micro-batch, or segments of its packed bins (padding segment included)."""
    batch_size: int
    """b of the ``[s, b, ...]`` activations (1 for THD)."""
    num_tokens: int
    """Local tokens s * b on this CP rank."""
    token_mask_sb: torch.Tensor | None
    """[s, b] float32 (1 = real token), only for unpacked rows with padding."""
    sample_ids_sb: torch.Tensor | None
    """[s * b] int64 sample of each token, ``num_samples`` for padding; packed bins only."""
    tokens_per_sample: torch.Tensor
    """[num_samples] float64 real tokens of each sample held by this rank."""


Localize = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
"""Maps [b, S] fields of a micro-batch (plus its ``cu_seqlens``) to this rank's share as the
model sees it: [b', s'] (CP chunks, THD flattening). :func:`meter.local_layout` is the one the
training hooks use; the identity is right for CP = 1 without THD."""


def _local(fields: dict[str, torch.Tensor], localize: Localize | None) -> dict[str, torch.Tensor]:
    return fields if localize is None else localize(fields)


def describe_micro_batch(
    batch: Mapping[str, torch.Tensor],
    *,
    localize: Localize | None = None,
    device: torch.device | str | None = None,
) -> MicroBatchSamples:
    """Sample layout of one micro-batch, computed once and shared by every layer's hook.

    Args:
        batch: the dict the data iterator yields, *whole* (before any CP split): ``tokens``
            (or ``token_mask``) [b, S] gives the shape; ``token_mask`` [b, S] (1 = real token)
            is optional; packed batches carry ``cu_seqlens`` (or ``cu_seqlens_padded``,
            preferred) int [n + 1] over the flattened b * S tokens, as TE takes them.
        localize: how the forward step cuts the micro-batch for this rank (see
            :data:`Localize`); the sample of every token is computed on the whole batch and
            cut the same way, so the layout matches what the ``linear_qkv`` hook receives
            (CP chunks; [b * S / CP, 1, R] for THD) by construction.
        device: where the activations live (the batch may still be on the host when the
            iterator yields it); defaults to the batch's device.
    """
    shape_source = batch.get("token_mask")
    if shape_source is None:
        shape_source = batch.get("tokens")
    if shape_source is None or shape_source.dim() != 2:
        raise ValueError(
            "LongAct needs a [b, s] `tokens` or `token_mask` tensor in each micro-batch to know "
            "the sample layout"
        )
    b, s = shape_source.shape
    device = shape_source.device if device is None else torch.device(device)
    token_mask = batch.get("token_mask")
    mask_bs = None if token_mask is None else (token_mask != 0)
    fields = {"tokens": shape_source}
    for key in ("cu_seqlens", "cu_seqlens_padded", "max_seqlen"):
        if key in batch:
            fields[key] = batch[key]
    cu = batch.get("cu_seqlens_padded", batch.get("cu_seqlens"))
    if cu is None:
        if mask_bs is not None:
            fields["token_mask"] = mask_bs.to(torch.float32)
        local = _local(fields, localize)
        lb, ls = local["tokens"].shape
        if mask_bs is None:
            tokens = torch.full((lb,), float(ls), dtype=torch.float64, device=device)
            return MicroBatchSamples(num_samples=lb, batch_size=lb, num_tokens=lb * ls,
                                     token_mask_sb=None, sample_ids_sb=None,
                                     tokens_per_sample=tokens)  # fmt: skip
        local_mask = local["token_mask"].to(device)
        return MicroBatchSamples(
            num_samples=lb,
            batch_size=lb,
            num_tokens=lb * ls,
            token_mask_sb=local_mask.t().contiguous(),
            sample_ids_sb=None,
            tokens_per_sample=local_mask.sum(dim=1).to(torch.float64),
        )
    cu = cu.to(dtype=torch.int64).flatten()
    if int(cu[0]) != 0 or int(cu[-1]) != b * s:
        raise ValueError(
            f"cu_seqlens must run from 0 to the packed token count (b * S = {b * s}), "
            f"got {cu.tolist()}; include the trailing padding segment"
        )
    num_segments = cu.numel() - 1
    ids_bs = torch.repeat_interleave(
        torch.arange(num_segments, device=cu.device), cu[1:] - cu[:-1]
    ).view(b, s)
    if mask_bs is not None:
        ids_bs = ids_bs.masked_fill(~mask_bs.to(ids_bs.device), num_segments)
    fields["sample_ids"] = ids_bs
    local = _local(fields, localize)
    local_ids = local["sample_ids"].to(device)
    lb = local_ids.shape[0]
    counts = torch.bincount(local_ids.flatten(), minlength=num_segments + 1)[:num_segments]
    return MicroBatchSamples(
        num_samples=num_segments,
        batch_size=lb,
        num_tokens=local_ids.numel(),
        token_mask_sb=None,
        sample_ids_sb=local_ids.t().reshape(-1),
        tokens_per_sample=counts.to(torch.float64),
    )


def per_sample_sum_squares(output: torch.Tensor, samples: MicroBatchSamples) -> torch.Tensor:
    """Sum over each sample's real tokens of the squared activations.

    Args:
        output: ``linear_qkv`` output [s, b, R] (sbhd) or [t, 1, R] (THD), any float dtype.
        samples: the micro-batch's layout from :func:`describe_micro_batch`.

    Returns:
        [num_samples, R] float32. Squares are taken in fp32 over sequence chunks of at most
        ``HOOK_CHUNK_BYTES``, the only temporary (a full fp32 copy of a 32k-token Qwen3-8B
        ``linear_qkv`` output would be ~0.8 GB).
    """
    seq, batch, rows = output.shape
    if seq * batch != samples.num_tokens or batch != samples.batch_size:
        raise ValueError(
            f"linear_qkv output {tuple(output.shape)} does not match the micro-batch layout "
            f"(b={samples.batch_size}, {samples.num_tokens} local tokens); LongAct reads the "
            "batch the data iterator yielded last: wrap that iterator with observe()"
        )
    packed = samples.sample_ids_sb is not None
    # The last row of a packed sum collects padding tokens and is dropped.
    sums = torch.zeros(
        samples.num_samples + int(packed), rows, dtype=torch.float32, device=output.device
    )
    step = max(1, HOOK_CHUNK_BYTES // (4 * rows * batch))
    for start in range(0, seq, step):
        part = output[start : start + step].detach()
        # One pass for fp32 (square into a new tensor), two for bf16 (upcast, square in place).
        squares = part.square() if part.dtype == torch.float32 else part.float().square_()
        if packed:
            ids = samples.sample_ids_sb[start * batch : (start + squares.shape[0]) * batch]
            sums.index_add_(0, ids, squares.reshape(-1, rows))
            continue
        if samples.token_mask_sb is not None:
            squares.mul_(samples.token_mask_sb[start : start + step].unsqueeze(-1))
        sums += squares.sum(dim=0)
    return sums[: samples.num_samples]


class SaliencyAccumulator:
    """Running Eq. 2 sums for the layers of one pipeline stage, on this rank's rows.

    Call order per step: for every micro-batch :meth:`begin_micro_batch`, then :meth:`add` once
    per layer; at the end :meth:`reduce` (collective). No hooks here: :mod:`meter` feeds it.
    Memory: one float64 vector of ``num_local_rows`` per layer.
    """

    def __init__(
        self,
        layer_numbers: list[int],
        *,
        num_local_rows: int,
        device: torch.device | str = "cpu",
        cp_group=None,
    ) -> None:
        self.layer_numbers = sorted(layer_numbers)
        self.num_local_rows = num_local_rows
        self.cp_group = cp_group
        self.cp_size = 1 if cp_group is None else dist.get_world_size(cp_group)
        # Row 0 holds the sample count so one collective reduces everything.
        self._flat = torch.zeros(
            1 + len(self.layer_numbers) * num_local_rows, dtype=torch.float64, device=device
        )
        self._index = {n: i for i, n in enumerate(self.layer_numbers)}
        self._samples: MicroBatchSamples | None = None
        self._pending: dict[int, torch.Tensor] = {}

    @property
    def samples(self) -> MicroBatchSamples | None:
        """The micro-batch being measured; None when nothing is being measured."""
        return self._samples

    @property
    def num_samples(self) -> int:
        """Samples measured on this rank since the last :meth:`reduce`."""
        return int(self._flat[0])

    def _layer_sums(self, layer_number: int) -> torch.Tensor:
        start = 1 + self._index[layer_number] * self.num_local_rows
        return self._flat[start : start + self.num_local_rows]

    def begin_micro_batch(self, samples: MicroBatchSamples) -> None:
        """Starts a micro-batch (closing the previous one; collective over CP when cp > 1)."""
        self.end_micro_batch()
        self._samples = samples
        if self.cp_size == 1:
            self._count_samples(samples.tokens_per_sample)

    def add(self, layer_number: int, output: torch.Tensor) -> None:
        """Adds one layer's ``linear_qkv`` output [s, b, R] for the current micro-batch."""
        sums = per_sample_sum_squares(output, self._samples)
        if self.cp_size > 1:
            self._pending[layer_number] = sums
            return
        # A sample without real tokens has a zero sum, so it adds sqrt(0) = 0: no filtering.
        self._layer_sums(layer_number).add_(sums.sqrt_().sum(dim=0))

    def end_micro_batch(self) -> None:
        """Closes the current micro-batch: one CP all-reduce of its per-sample sums, then sqrt.

        All CP ranks must call it at the same point (they run the same schedule).
        """
        samples, self._samples = self._samples, None
        if self.cp_size == 1 or samples is None:
            return
        layers = sorted(self._pending)
        counts = samples.tokens_per_sample.to(device=self._flat.device, dtype=torch.float32)
        flat = torch.cat([counts[:, None], *(self._pending[n] for n in layers)], dim=1)
        dist.all_reduce(flat, group=self.cp_group)
        self._count_samples(flat[:, 0])
        roots = flat[:, 1:].sqrt_().sum(dim=0).view(len(layers), self.num_local_rows)
        for i, number in enumerate(layers):
            self._layer_sums(number).add_(roots[i])
        self._pending.clear()

    def _count_samples(self, tokens_per_sample: torch.Tensor) -> None:
        # Stays on the device: no host sync inside the forward.
        self._flat[:1] += (tokens_per_sample > 0).sum().to(self._flat)

    def reduce(self, *, dp_group=None, tp_group=None) -> tuple[dict[int, torch.Tensor], int]:
        """Ends the step: M over the global batch for every layer of this stage, full rows.

        Sums and sample counts are all-reduced over ``dp_group`` (data parallel *without* CP:
        CP ranks already agree after :meth:`end_micro_batch`), then rows are all-gathered over
        ``tp_group`` in rank order. All ranks of both groups must call it.

        Returns:
            ({layer: M rows [T * R] float32}, global sample count), identical on all ranks of
            the stage (M is 0 where nothing was measured). Resets the accumulator.
        """
        self.end_micro_batch()
        flat = self._flat.clone()
        if dp_group is not None and dist.get_world_size(dp_group) > 1:
            dist.all_reduce(flat, group=dp_group)
        num_samples = int(round(float(flat[0])))
        per_layer = flat[1:].view(len(self.layer_numbers), self.num_local_rows)
        if tp_group is not None and dist.get_world_size(tp_group) > 1:
            parts = [torch.empty_like(per_layer) for _ in range(dist.get_world_size(tp_group))]
            dist.all_gather(parts, per_layer.contiguous(), group=tp_group)
            per_layer = torch.cat(parts, dim=1)
        self.reset()
        mean = (per_layer / max(num_samples, 1)).to(torch.float32)
        return {n: mean[i] for i, n in enumerate(self.layer_numbers)}, num_samples

    def reset(self) -> None:
        """Drops everything measured so far."""
        self._flat.zero_()
        self._pending.clear()
        self._samples = None
