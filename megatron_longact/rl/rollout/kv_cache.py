"""A KV cache of rotated keys for megatron's static-batching inference path.

megatron-core 0.16's static path (``transformer/attention.py``,
``Attention._adjust_key_value_for_inference`` ~446-627) stores keys *before* RoPE and returns
the rotary table for the whole cache (``k_pos_emb[:sequence_end]``, ~577), so every decode step
rotates every cached key of every layer again: cos, sin, two products and a concat over the
cache, O(sequence) work per token that the profile of the native engine was dominated by.
Only its flash-decode branch (~533-566) caches rotated keys, and that branch needs the CUDA
flash-attention kernel.

:func:`rotated_key_cache` swaps that one method, per attention instance and only inside the
context, for one that rotates the new keys once (megatron's own ``apply_rotary_pos_emb`` on the
new positions' slice of the same table), stores them, and returns ``(q_pos_emb, None)`` so that
the attention forward rotates the query only (it skips keys when ``k_pos_emb`` is None, ~1109).
Everything else (the buffers' layout, the mask type switch after the prompt, the returned
views) is the static branch's. Each key is rotated by the same elementwise operations on the
same values as before, so the logits are bit-identical (``tests/rl/test_rollout_native.py``
checks it against the stock path).

:func:`grouped_query_attention` swaps megatron's local ``DotProductAttention.forward`` in the
same way for one that reads each cached K/V head once per query group. The stock forward
``repeat_interleave``s K and V to every query head (``transformer/dot_product_attention.py``
~165-172), which copies the whole cache N/G times per layer and token: with SmolLM2's 9 heads in
3 groups that copy was a third of the attention time of a decode step. The grouped forward folds
the N/G heads of a group into the query rows of one batched matmul and keeps megatron's own
masked softmax, so only the two matmuls' shapes change (the logits move within ~1e-6).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# At the top, not in the functions: those run per layer and token. rope_utils and attention
# as modules, so that attribute lookups at call time keep any later patch of them in effect.
from megatron.core.models.common.embeddings import rope_utils
from megatron.core.transformer import attention as mcore_attention
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from megatron_longact.runtime.mcore_compat import patched_methods


def _rotate_new(self, query, key, rotary_pos_emb, start: int, end: int):
    """RoPE at positions ``start:end`` on the new keys, and on the queries too when both use
    one table (self-attention): then a single elementwise pass over the [q | k] heads, half
    the small ops of rotating them apart, and ``(query, key, None)`` is returned so that the
    attention forward does not rotate the query again (~1109). Otherwise the query's table
    slice is returned for the forward to apply. ``query`` [s, b, N, D], ``key`` [s, b, G, D].
    """
    q_pos_emb, k_pos_emb = rotary_pos_emb
    mscale = mcore_attention._yarn_get_concentration_factor_from_config(self.config)

    def rotate(t: torch.Tensor) -> torch.Tensor:
        return rope_utils.apply_rotary_pos_emb(
            t, k_pos_emb[start:end], config=self.config, mscale=mscale,
            cp_group=self.pg_collection.cp,
        )  # fmt: skip

    if q_pos_emb is not k_pos_emb or query.shape[-1] != key.shape[-1]:
        return query, rotate(key), (q_pos_emb[start:end], None)
    heads = query.size(2)
    both = rotate(torch.cat((query, key), dim=2))
    return both[:, :, :heads], both[:, :, heads:], None


def _adjust_static(
    self,
    inference_context,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rotary_pos_emb,
    rotary_pos_cos=None,
    rotary_pos_sin=None,
    rotary_pos_cos_sin=None,
    sequence_len_offset=None,
    *,
    inference_params=None,
):
    """The static branch of ``Attention._adjust_key_value_for_inference`` with rotated keys in
    the cache. ``self`` is the megatron ``Attention``; shapes are megatron's sbhd
    ([s, b, heads, D])."""
    context = inference_context if inference_context is not None else inference_params
    if context is None or not context.is_static_batching():
        return type(self)._adjust_key_value_for_inference(
            self, inference_context, query, key, value, rotary_pos_emb, rotary_pos_cos,
            rotary_pos_sin, rotary_pos_cos_sin, sequence_len_offset,
            inference_params=inference_params,
        )  # fmt: skip
    memory = context.key_value_memory_dict.get(self.layer_number)
    if memory is None:
        shape = (context.max_sequence_length, context.max_batch_size,
                 self.num_query_groups_per_partition)  # fmt: skip
        memory = (
            torch.empty(*shape, self.key_hidden_size, dtype=key.dtype, device=key.device),
            torch.empty(*shape, self.val_hidden_size, dtype=value.dtype, device=value.device),
        )
        context.key_value_memory_dict[self.layer_number] = memory
    key_memory, value_memory = memory
    start = context.sequence_len_offset
    end = start + key.size(0)
    batch_start = context.batch_size_offset
    batch_end = batch_start + key.size(1)
    if end > key_memory.size(0) or batch_end > key_memory.size(1):
        raise ValueError(
            f"KV cache holds {tuple(key_memory.shape[:2])} (tokens, rows); step needs "
            f"({end}, {batch_end})"
        )
    # After the prompt step the queries are the newest tokens: no causal mask (as megatron).
    attn_mask_type = self.attn_mask_type if start == 0 else AttnMaskType.no_mask
    if rotary_pos_emb is not None:
        if not isinstance(rotary_pos_emb, tuple):
            rotary_pos_emb = (rotary_pos_emb, rotary_pos_emb)
        query, key, rotary_pos_emb = _rotate_new(self, query, key, rotary_pos_emb, start, end)
    key_memory[start:end, batch_start:batch_end] = key
    value_memory[start:end, batch_start:batch_end] = value
    return (
        query,
        key_memory[:end, batch_start:batch_end],
        value_memory[:end, batch_start:batch_end],
        rotary_pos_emb,
        attn_mask_type,
        None,
    )


def _grouped_attention_forward(
    self,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    attn_mask_type=None,
    attention_bias: torch.Tensor | None = None,
    packed_seq_params=None,
) -> torch.Tensor:
    """megatron's ``DotProductAttention.forward`` in eval mode without the K/V repeat.

    ``query`` [sq, b, N, D], ``key``/``value`` [sk, b, G, D] (any strides: views of the
    cache), ``attention_mask`` [b, 1, sq, sk] bool, True = masked. Returns [sq, b, N*D].
    Query head h reads group h // (N/G), as after megatron's ``repeat_interleave``.
    """
    assert packed_seq_params is None and attention_bias is None and not self.training
    sq, batch, heads, dim = query.shape
    sk, groups = key.size(0), key.size(2)
    per_group = heads // groups
    # [b*G, (N/G)*sq, D]: a group's heads share one K/V matrix, so they share one matmul.
    grouped_q = query.permute(1, 2, 0, 3).reshape(batch * groups, per_group * sq, dim)
    keys_t = key.permute(1, 2, 3, 0).reshape(batch * groups, dim, sk)  # a view of the cache
    # A fresh buffer, not megatron's shared "mpu" one: under inference mode (decode steps,
    # native._only_local_attention) a buffer it grew would be an inference tensor that
    # training's attention later reuses.
    scores = torch.empty(batch * groups, per_group * sq, sk, dtype=query.dtype,
                         device=query.device)  # fmt: skip
    scores = torch.baddbmm(scores, grouped_q, keys_t, beta=0.0, alpha=self.softmax_scale)
    probs = self.scale_mask_softmax(
        scores.view(batch, heads, sq, sk), attention_mask, self.softmax_offset
    )
    values = value.permute(1, 2, 0, 3).reshape(batch * groups, sk, dim)  # a view of the cache
    context = torch.bmm(probs.view(batch * groups, per_group * sq, sk), values)
    context = context.view(batch, heads, sq, dim).permute(2, 0, 1, 3)
    return context.reshape(sq, batch, heads * dim)


def has_local_attention(attention) -> bool:
    """Whether megatron ``Attention`` module ``attention`` computes with megatron's local
    ``DotProductAttention`` (or our subclass of it that only adds packed THD rows; not TE's,
    not our CP attention), the one :func:`grouped_query_attention` replaces."""
    return isinstance(attention.core_attention, DotProductAttention)


def attention_modules(gpt) -> list:
    """The megatron ``Attention`` modules of ``gpt``."""
    return [m for m in gpt.modules() if isinstance(m, mcore_attention.Attention)]


@contextlib.contextmanager
def grouped_query_attention(gpt) -> Iterator[None]:
    """Inside it, the local core attentions of ``gpt`` (:func:`has_local_attention`; TE's and
    our CP attention are left alone) attend per query group without copying K/V. Eval mode
    only (no attention dropout). No collectives."""
    modules = [m.core_attention for m in attention_modules(gpt) if has_local_attention(m)]
    with patched_methods(modules, "forward", lambda _: _grouped_attention_forward):
        yield


@contextlib.contextmanager
def rotated_key_cache(gpt) -> Iterator[None]:
    """Inside it, the attention layers of ``gpt`` (a bare GPTModel) cache rotated keys under a
    ``StaticInferenceContext``; outside it, megatron's method is back. No collectives."""
    modules = attention_modules(gpt)
    with patched_methods(modules, "_adjust_key_value_for_inference", lambda _: _adjust_static):
        yield
