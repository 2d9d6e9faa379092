"""Sequence-parallel-capable RMSNorm for megatron's local (non-TE) layer spec.

megatron's local norm (``WrappedTorchNorm``, ``transformer/torch_norm.py`` ~32) asserts
sequence parallel is off, so the local spec cannot run TP with sequence parallel. megatron's
MoE layer refuses to train at TP > 1 without it (``transformer/moe/moe_layer.py`` ~379), which
leaves MoE x TP without a CPU path. With sequence parallel a norm sees its rank's 1/TP of the
tokens, so its weight gradient is partial over TP; ``finalize_model_grads`` all-reduces the
grads of parameters marked ``sequence_parallel`` (``distributed/finalize_model_grads.py``
~354). This norm is ``torch.nn.RMSNorm`` (the module ``WrappedTorchNorm`` returns, so the
same bits) with that mark; TE's norms carry the same mark on GPU.
"""

from __future__ import annotations

import torch


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` over the last dim (``hidden_size``), weight marked for the TP
    all-reduce of sequence parallel. Built by megatron's ``build_module`` like its norms."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused) -> None:
        super().__init__(normalized_shape=hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel


class HeadRMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` for Q/K norm under sequence parallel (it normalises each head of
    the full-sequence q/k, after the linear's gather): not marked, as its TP all-reduce is by
    name (``q_layernorm``/``k_layernorm``, ``finalize_model_grads.py`` ~354-356)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused) -> None:
        super().__init__(normalized_shape=hidden_size, eps=eps)


def sequence_parallel_block(layer_spec, config, *, pp_rank: int | None = None):
    """A ``TransformerBlockSubmodules`` for GPTModel: ``layer_spec`` (the local GPT layer spec)
    with :class:`SequenceParallelRMSNorm` as its input and pre-MLP norms (:class:`HeadRMSNorm`
    as Q/K norms), this pipeline stage's
    number of layers, and the same norm as the final layer norm (the block's default would be
    the asserting local one, ``transformer/transformer_block.py`` ~255-259)."""
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    layer_spec.submodules.input_layernorm = SequenceParallelRMSNorm
    layer_spec.submodules.pre_mlp_layernorm = SequenceParallelRMSNorm
    attention = layer_spec.submodules.self_attention.submodules
    if attention.q_layernorm is not None:
        attention.q_layernorm = attention.k_layernorm = HeadRMSNorm
    num_layers = get_num_layers_to_build(config, pp_rank=pp_rank)
    return TransformerBlockSubmodules(
        layer_specs=[layer_spec] * num_layers, layer_norm=SequenceParallelRMSNorm
    )
