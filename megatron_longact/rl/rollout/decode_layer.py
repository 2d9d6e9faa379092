"""A decode step through megatron's ``TransformerLayer`` without the layer's training bookkeeping.

At one token per row the matmuls are small, and megatron 0.16's
``TransformerLayer._forward_attention`` / ``_forward_mlp`` (``transformer/transformer_layer.py``
~521-835) and ``Attention.forward`` (``transformer/attention.py`` ~875-1215) add per layer and
token activation-offload context managers, recompute and CUDA-graph checks, NVTX ranges, the
identity cross-attention modules, and ``make_viewless_tensor``. :func:`lean_decode_layers`
binds, per layer and only inside the context, a forward that calls the layer's own modules in
the stock order (input norm, ``get_query_key_value_tensors``,
``_adjust_key_value_for_inference``, RoPE as ``Attention.forward`` applies it, core attention,
``linear_proj``, the layer's own bias-dropout-add, pre-MLP norm, MLP, bias-dropout-add), so the
result is bit-identical (``tests/rl/test_rollout_native.py`` compares the engine with and
without it with ``==``). Module calls go through ``nn.Module.__call__``, so forward hooks (DDP's
parameter gathers) run.

Only decode steps (a static inference context past the prompt) take the lean path; the prompt
step and every layer or config it does not cover (:func:`_covered`) run megatron's forward.
Measured on CPU (``benchmarks/rollout_throughput.py``): ~10% of the native engine's time on a
tiny model, a few % on SmolLM2-135M.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from megatron.core.models.common.embeddings import rope_utils
from megatron.core.transformer import attention as mcore_attention
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_longact.rl.rollout.kv_cache import has_local_attention
from megatron_longact.runtime.mcore_compat import patched_methods


def _decode_forward(
    self,
    hidden_states,
    attention_mask=None,
    context=None,
    context_mask=None,
    rotary_pos_emb=None,
    rotary_pos_cos=None,
    rotary_pos_sin=None,
    rotary_pos_cos_sin=None,
    attention_bias=None,
    inference_context=None,
    packed_seq_params=None,
    sequence_len_offset=None,
    padding_mask=None,
    **kwargs,
):
    """``TransformerLayer.forward`` for one decode step: ``hidden_states`` [s, b, h] ->
    ``(hidden_states [s, b, h], None)``. Anything but a static decode step goes to megatron."""
    decode = (
        inference_context is not None
        and inference_context.is_static_batching()
        and inference_context.sequence_len_offset > 0
        and not self.training
        and context is None
        and attention_bias is None
        and packed_seq_params is None
        and rotary_pos_cos is None
        and rotary_pos_sin is None
        and rotary_pos_cos_sin is None
        and not kwargs
    )
    if not decode:
        return TransformerLayer.forward(
            self, hidden_states, attention_mask=attention_mask, context=context,
            context_mask=context_mask, rotary_pos_emb=rotary_pos_emb,
            rotary_pos_cos=rotary_pos_cos, rotary_pos_sin=rotary_pos_sin,
            rotary_pos_cos_sin=rotary_pos_cos_sin, attention_bias=attention_bias,
            inference_context=inference_context, packed_seq_params=packed_seq_params,
            sequence_len_offset=sequence_len_offset, padding_mask=padding_mask, **kwargs,
        )  # fmt: skip
    attention = self.self_attention
    residual = hidden_states
    normed = self.input_layernorm(hidden_states)
    query, key, value = attention.get_query_key_value_tensors(normed, None, split_qkv=True)
    if rotary_pos_emb is not None and not isinstance(rotary_pos_emb, tuple):
        rotary_pos_emb = (rotary_pos_emb,) * 2
    query, key, value, rotary_pos_emb, mask_type, _ = attention._adjust_key_value_for_inference(
        inference_context, query, key, value, rotary_pos_emb, None, None, None, sequence_len_offset
    )
    if rotary_pos_emb is not None:  # what the static path left to rotate (attention.py ~1109)
        mscale = mcore_attention._yarn_get_concentration_factor_from_config(attention.config)
        cp_group = attention.pg_collection.cp
        q_pos_emb, k_pos_emb = rotary_pos_emb
        if q_pos_emb is not None:
            query = rope_utils.apply_rotary_pos_emb(
                query, q_pos_emb, config=attention.config, mscale=mscale, cp_group=cp_group
            )
        if k_pos_emb is not None:
            key = rope_utils.apply_rotary_pos_emb(
                key, k_pos_emb, config=attention.config, mscale=mscale, cp_group=cp_group
            )
    core = attention.core_attention(query, key, value, attention_mask, attn_mask_type=mask_type)
    fusion = self.config.bias_dropout_fusion
    hidden_states = self.self_attn_bda(False, fusion)(
        attention.linear_proj(core), residual, self.hidden_dropout
    )
    residual = hidden_states
    mlp_output = self.mlp(self.pre_mlp_layernorm(hidden_states))
    return self.mlp_bda(False, fusion)(mlp_output, residual, self.hidden_dropout), None


def _covered(layer) -> bool:
    """Whether :func:`_decode_forward` computes exactly what megatron's forward does for
    ``layer``: a dense self-attention layer with megatron's local attention, no cross attention,
    no activation offloading, and none of the inference paths it does not reproduce."""
    attention = getattr(layer, "self_attention", None)
    config = layer.config
    return (
        type(layer) is TransformerLayer
        and type(attention) is mcore_attention.SelfAttention
        and has_local_attention(attention)
        and type(layer.mlp) in (MLP, MoELayer)  # called the same way, (output, bias) back
        and isinstance(layer.pre_cross_attn_layernorm, IdentityOp)
        and isinstance(layer.cross_attention, IdentityOp)
        and not (layer.offload_attn_norm or layer.offload_mlp_norm)
        and not (attention.offload_qkv_linear or attention.offload_core_attention)
        and not attention.offload_attn_proj
        and not config.inference_fuse_tp_communication
        and not config.flash_decode
        and not config.attention_output_gate
        and not config.no_rope_freq
        and not config.test_mode
    )


@contextlib.contextmanager
def lean_decode_layers(gpt) -> Iterator[None]:
    """Inside it, the covered ``TransformerLayer``s of ``gpt`` run decode steps through
    :func:`_decode_forward`; outside it, megatron's forward is back. No collectives of its own
    (the modules' TP collectives run as in the stock forward)."""
    layers = [m for m in gpt.modules() if isinstance(m, TransformerLayer) and _covered(m)]
    with patched_methods(layers, "forward", lambda _: _decode_forward):
        yield
