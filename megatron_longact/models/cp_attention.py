"""Context-parallel core attention for megatron's local (non-TE) layer spec.

megatron's local ``DotProductAttention`` asserts CP == 1 and refuses packed (THD) input
(``transformer/dot_product_attention.py`` ~57 and ~150); only Transformer Engine's attention
does context parallel, and TE needs a GPU. This module is the all-gather design of the Llama 3
paper (Dubey et al. 2024, section 3.3.2 "context parallelism"): each CP rank keeps its query
tokens (megatron's zig-zag chunks ``r`` and ``2CP-1-r``, :mod:`models.cp_layout`), K and V are
all-gathered over the CP group, put back in global order, and the causal (and packed-segment)
mask comes from global positions. In backward the gathered dK/dV are reduce-scattered back to
the ranks that own the tokens (a custom autograd Function). GQA gathers the G/TP KV heads only.

Where it is used (see the README, "Context parallel"): ``model.attention_backend=local`` (or
``auto`` without TE/CUDA) with ``context_parallel_size > 1``; TE's ring attention stays the GPU
default. CP == 1 keeps megatron's own local attention, as :class:`PackedDotProductAttention`:
megatron's kernel on dense rows, and on packed THD rows one segment at a time.

Memory, per layer and micro-batch, on each rank (``b`` rows, ``S`` tokens per row before the
CP split, ``G_tp = G/TP`` KV heads, ``N_tp = N/TP`` query heads, ``D`` head dim):

* gathered K and V: ``2 * b * S * G_tp * D`` elements of the activation dtype (CP times the
  local K/V). Autograd keeps them for backward unless the layer is recomputed;
* scores and probabilities: ``b * N_tp * (S / CP) * S`` elements (fp32 for the softmax), like
  megatron's unfused local attention at CP == 1 divided by CP. This is an exact, unfused
  kernel for CPUs and GPUs without TE, not a flash kernel: keep ``S`` moderate there.

Packed THD input (``PackedSeqParams(qkv_format="thd")``) uses ``cu_seqlens_q_padded`` when set
(tokens are laid out on padded boundaries); padding at a segment's end is never seen by that
segment's real tokens (causality), so actual lengths need no separate mask.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.module import MegatronModule

from megatron_longact.errors import UserError
from megatron_longact.models.cp_layout import cp_gather_order, cp_token_index

_LOCAL_ONLY = False
MASKED_SCORE = torch.finfo(torch.float32).min
"""Score of a masked (query, key) pair; finite, so a fully masked row cannot produce NaN."""


@contextlib.contextmanager
def local_attention_only() -> Iterator[None]:
    """Inside it, CP attention is plain full local attention on whatever sequence it gets."""
    # No collectives, positions 0..s-1 of the local tensors, the caller's attention_mask as
    # given: for generation, where each CP rank holds whole sequences. RoPE slicing per CP
    # rank happens in GPTModel, not here; the caller handles it.
    global _LOCAL_ONLY
    previous, _LOCAL_ONLY = _LOCAL_ONLY, True
    try:
        yield
    finally:
        _LOCAL_ONLY = previous


def is_local_only() -> bool:
    """True inside :func:`local_attention_only` (no CP collectives in attention)."""
    return _LOCAL_ONLY


class _GatherFirstDim(torch.autograd.Function):
    """All-gather along dim 0 over ``group`` (rank order); backward reduce-scatters the grad."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        size = dist.get_world_size(group)
        local = local.contiguous()
        out = local.new_empty((size * local.shape[0], *local.shape[1:]))
        dist.all_gather_into_tensor(out, local, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        size = dist.get_world_size(ctx.group)
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // size, *grad.shape[1:]))
        # Every rank's queries attended to every rank's keys: sum the key grads of all ranks.
        dist.reduce_scatter_tensor(out, grad, group=ctx.group)
        return out, None


def gather_kv(key: torch.Tensor, value: torch.Tensor, *, group) -> tuple[torch.Tensor, ...]:
    """K and V [s_local, b, g, d] of every CP rank -> [CP * s_local, b, g, d] each, rank order.

    One collective for both (concatenated on the head dim). Differentiable: backward is one
    reduce-scatter. All ranks of ``group`` must call it.
    """
    packed = _GatherFirstDim.apply(torch.cat([key, value], dim=-1), group)
    return packed.split([key.shape[-1], value.shape[-1]], dim=-1)


def _blocked(
    q_pos: torch.Tensor, k_pos: torch.Tensor, boundaries: torch.Tensor | None
) -> torch.Tensor:
    """[sq, sk] bool, True = masked: keys after the query, or in another packed segment."""
    blocked = k_pos[None, :] > q_pos[:, None]
    if boundaries is not None:
        bounds = boundaries.to(device=q_pos.device, dtype=torch.int64)[1:-1]
        q_seg = torch.bucketize(q_pos, bounds, right=True)
        k_seg = torch.bucketize(k_pos, bounds, right=True)
        blocked |= q_seg[:, None] != k_seg[None, :]
    return blocked


class ContextParallelAttention(MegatronModule):
    """Drop-in ``core_attention`` submodule (the signature of megatron's DotProductAttention).

    Shapes: ``query`` [sq, b, N_tp, D], ``key``/``value`` [sk, b, G_tp, D] (sbhd), or
    [t, N_tp, D] / [t, G_tp, D] with THD ``packed_seq_params``. Returns [sq, b, N_tp * D]
    ([t, N_tp * D] for THD). ``attention_mask`` (True = masked out), when given, is
    [b or 1, 1, sq, S] against keys in *global* order (a full mask sliced on its query dim, as
    ``get_batch_on_this_cp_rank`` does); without it the mask is causal from global positions.
    The forward is a collective over the CP group (all ranks of it call it in the same order,
    which megatron's schedules do), except inside :func:`local_attention_only`.
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ) -> None:
        super().__init__(config=config)
        from megatron.core import parallel_state
        from megatron.core.transformer.enums import AttnMaskType
        from megatron.core.transformer.utils import is_layer_window_attention

        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise UserError(
                f"softmax_type={config.softmax_type!r} is not supported by the local CP "
                "attention; use model.attention_backend=te"
            )
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq,
                                     layer_number):  # fmt: skip
            raise UserError(
                "sliding-window attention is not supported by the local CP attention; use "
                "model.attention_backend=te"
            )
        self.config = config
        self.layer_number = max(1, layer_number)
        self.causal = attn_mask_type == AttnMaskType.causal
        tp = config.tensor_model_parallel_size
        if pg_collection is not None and getattr(pg_collection, "tp", None) is not None:
            tp = pg_collection.tp.size()
        self.cp_group = (
            pg_collection.cp
            if pg_collection is not None and getattr(pg_collection, "cp", None) is not None
            else parallel_state.get_context_parallel_group()
        )
        self.num_heads = config.num_attention_heads // tp
        self.num_groups = config.num_query_groups // tp
        # The same total scale as megatron's (softmax_scale / coeff, then x coeff in softmax).
        self.softmax_scale = (
            softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        )
        self.dropout = torch.nn.Dropout(
            config.attention_dropout if attention_dropout is None else attention_dropout
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type=None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise UserError("attention_bias is not supported by the local CP attention")
        thd = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        boundaries = None
        if thd:
            query, key, value = (x.unsqueeze(1) for x in (query, key, value))
            boundaries = packed_seq_params.cu_seqlens_q_padded
            if boundaries is None:
                boundaries = packed_seq_params.cu_seqlens_q
        cp = 1 if is_local_only() else dist.get_world_size(self.cp_group)
        sq, sk = query.shape[0], key.shape[0]
        if cp > 1:
            rank = dist.get_rank(self.cp_group)
            total = cp * sk
            segments = boundaries if thd else torch.tensor([0, total])
            if int(segments[-1]) != total:
                raise ValueError(
                    f"packed cu_seqlens end at {int(segments[-1])}, but the CP ranks hold "
                    f"{total} tokens together; pass the global (padded) boundaries"
                )
            key, value = gather_kv(key, value, group=self.cp_group)
            order = cp_gather_order(segments, cp_size=cp).to(key.device).argsort()
            key, value = key.index_select(0, order), value.index_select(0, order)
            q_pos = cp_token_index(segments, cp_size=cp, cp_rank=rank).to(query.device)
        else:
            # Generation: the last sq of sk positions are the queries (KV cache before them).
            q_pos = torch.arange(sk - sq, sk, device=query.device)
        k_pos = torch.arange(key.shape[0], device=query.device)
        context = self._attend(query, key, value, attention_mask, q_pos, k_pos, boundaries)
        return context.squeeze(1) if thd else context

    def _attend(self, query, key, value, attention_mask, q_pos, k_pos, boundaries):
        """Exact softmax attention; [sq, b, N_tp, D] x [sk, b, G_tp, D] -> [sq, b, N_tp*D]."""
        sq, b, heads, dim = query.shape
        sk, groups = key.shape[0], self.num_groups
        # GQA without copying K/V: [b, G, N/G, sq, D] @ [b, G, 1, D, sk].
        q = query.permute(1, 2, 0, 3).reshape(b, groups, heads // groups, sq, dim)
        k = key.permute(1, 2, 3, 0).unsqueeze(2)
        v = value.permute(1, 2, 0, 3).unsqueeze(2)
        scores = torch.matmul(q, k).float().mul_(self.softmax_scale)  # [b, G, N/G, sq, sk]
        if attention_mask is not None:
            if attention_mask.shape[-2:] != (sq, sk):
                raise ValueError(
                    f"attention_mask {tuple(attention_mask.shape)} does not match queries x "
                    f"keys ({sq}, {sk}); under CP slice a full mask on its query dim only"
                )
            blocked = attention_mask.view(attention_mask.shape[0], 1, 1, sq, sk)
        elif self.causal or boundaries is not None:
            blocked = _blocked(q_pos, k_pos, boundaries)
        else:
            blocked = None
        if blocked is not None:
            scores = scores.masked_fill(blocked, MASKED_SCORE)
        probs = torch.softmax(scores, dim=-1).to(value.dtype)
        if self.training and self.dropout.p > 0:
            from megatron.core import tensor_parallel

            with tensor_parallel.get_cuda_rng_tracker().fork():
                probs = self.dropout(probs)
        context = torch.matmul(probs, v)  # [b, G, N/G, sq, D]
        return context.reshape(b, heads, sq, dim).permute(2, 0, 1, 3).reshape(sq, b, heads * dim)


def with_cp_attention(layer_spec):
    """``layer_spec`` (megatron's local GPT layer spec) with :class:`ContextParallelAttention`
    as the self-attention's core attention. Modifies and returns the spec."""
    layer_spec.submodules.self_attention.submodules.core_attention = ContextParallelAttention
    return layer_spec


class PackedDotProductAttention(DotProductAttention):
    """megatron's local ``DotProductAttention`` (CP == 1) that also takes packed THD rows.

    Dense input (``packed_seq_params`` None) is megatron's forward unchanged, bit for bit.
    THD input (query [t, N_tp, D], key/value [t, G_tp, D], ``packed_seq_params`` thd) runs
    megatron's forward on each packed segment alone, causal within it: the same kernel a
    padded row of that sequence gets, so packed equals padded to rounding, and the work and
    the [N_tp, L_i, L_i] scores are per segment (sum of L_i^2, not T^2 of a block-causal mask
    over the whole row). Segments are the padded boundaries (``cu_seqlens_q_padded`` when
    set); a segment's trailing pads are never seen by its real tokens (causality). Returns
    [t, N_tp * D]. No collectives.
    """

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type=None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
            return super().forward(query, key, value, attention_mask,
                                   attn_mask_type=attn_mask_type, attention_bias=attention_bias,
                                   packed_seq_params=packed_seq_params)  # fmt: skip
        if attention_mask is not None:
            raise ValueError("packed THD attention takes cu_seqlens, not an attention_mask")
        boundaries = packed_seq_params.cu_seqlens_q_padded
        if boundaries is None:
            boundaries = packed_seq_params.cu_seqlens_q
        bounds = boundaries.tolist()
        if bounds[0] != 0 or bounds[-1] != query.shape[0]:
            raise ValueError(f"cu_seqlens {bounds} do not cover the {query.shape[0]} packed tokens")
        outputs = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            if end > start:  # [L, 1, N_tp, D] -> [L, 1, N_tp * D], causal (the layer's type)
                segment = (x[start:end].unsqueeze(1) for x in (query, key, value))
                outputs.append(super().forward(*segment, None, attention_bias=attention_bias))
        return torch.cat(outputs).squeeze(1)


def with_packed_attention(layer_spec):
    """``layer_spec`` (megatron's local GPT layer spec, CP == 1) with
    :class:`PackedDotProductAttention` as the self-attention's core attention. Modifies and
    returns the spec."""
    layer_spec.submodules.self_attention.submodules.core_attention = PackedDotProductAttention
    return layer_spec
