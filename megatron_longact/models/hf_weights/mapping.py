"""Names and tensor layouts shared by both conversion directions (pure torch, no megatron).

Hugging Face Qwen3, Qwen3-MoE, Qwen2 and Llama checkpoints use the same names (``model.layers.{i}.
self_attn.q_proj.weight`` ...). megatron-core fuses q, k and v into ``linear_qkv`` (rows grouped
per query group) and gate and up into ``linear_fc1``, and names its layer norms after the
linear layer they feed. The tables below are the one place these facts are written down.

Three namespaces appear:

* HF names: ``model.layers.3.mlp.gate_proj.weight``.
* megatron parameter names of a built chunk (``named_parameters``), layers numbered per
  pipeline stage: ``decoder.layers.0.input_layernorm.weight`` with the local spec, or
  ``decoder.layers.0.self_attention.linear_qkv.layer_norm_weight`` with Transformer Engine.
* megatron checkpoint keys (``dist_checkpointing``): layers stacked into one tensor with a
  leading layer axis, TE names for the norms whatever the spec (the local spec remaps its keys),
  and the ``module.`` prefix of the DDP wrapper that training saves through:
  ``module.decoder.layers.self_attention.linear_qkv.weight`` of shape [L, (N+2G)*D, H].
"""

from __future__ import annotations

import re
from typing import Any

import torch

from megatron_longact.errors import UserError
from megatron_longact.models.hf_config import HFArchitecture
from megatron_longact.models.qkv_layout import QKVLayout

CHECKPOINT_PREFIX = "module."
"""Prefix of model keys in our checkpoints (megatron DDP wraps the GPTModel as ``module``)."""

HF_LAYER_PREFIX = "model.layers.{}."
HF_EMBEDDING = "model.embed_tokens.weight"
HF_FINAL_NORM = "model.norm.weight"
HF_LM_HEAD = "lm_head.weight"

MCORE_EMBEDDING = "embedding.word_embeddings.weight"
MCORE_FINAL_NORM = "decoder.final_layernorm.weight"
MCORE_OUTPUT = "output_layer.weight"
MCORE_LAYER_PREFIX = "decoder.layers."

# Layer-local megatron suffix -> layer-local HF suffix, for tensors copied without reshaping
# (replicated over TP). Both spellings of each input norm are listed: the local spec's
# (parameter names on CPU) and Transformer Engine's (GPU parameters and every checkpoint key).
NORMS = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
}
# Row-parallel linears: same layout, sharded over TP along the input (column) dim 1.
ROW_PARALLEL = {
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
ROW_PARALLEL_DIM = 1
# Fused column-parallel linears: megatron suffix -> the HF suffixes fused into it, in order.
QKV = {
    "self_attention.linear_qkv.weight": (
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
    ),
    "self_attention.linear_qkv.bias": (
        "self_attn.q_proj.bias",
        "self_attn.k_proj.bias",
        "self_attn.v_proj.bias",
    ),
}
GATE_UP = {"mlp.linear_fc1.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight")}

# Mixture-of-experts layers (Qwen3-MoE). HF: a router ``mlp.gate`` [E, H] and per expert e
# ``mlp.experts.{e}.{gate,up,down}_proj.weight`` (what transformers 5's save_pretrained writes
# and vLLM's Qwen3MoeForCausalLM loads, not transformers' in-memory fused [E, 2I, H]). megatron:
# ``mlp.router.weight`` (replicated) and per local expert j, global index ep_rank * E_local + j,
# a SwiGLU ``linear_fc1`` [gate; up] (rows sharded over expert-TP) and ``linear_fc2`` (columns
# sharded over expert-TP). Parameter names: SequentialMLP's ``mlp.experts.local_experts.{j}.
# linear_fc1.weight`` or TEGroupedMLP's ``mlp.experts.linear_fc1.weight{j}``; checkpoint keys
# stack the experts of a layer: ``mlp.experts.experts.linear_fc1.weight`` [E, 2I, H]
# (experts.py ~768-805 and ~935-970, interchangeable between the two).
MCORE_ROUTER = "mlp.router.weight"
HF_ROUTER = "mlp.gate.weight"
HF_EXPERT_GATE_UP = ("mlp.experts.{}.gate_proj.weight", "mlp.experts.{}.up_proj.weight")
HF_EXPERT_DOWN = "mlp.experts.{}.down_proj.weight"
EXPERT_FC1, EXPERT_FC2 = "linear_fc1", "linear_fc2"
STACKED_EXPERTS = {
    "mlp.experts.experts.linear_fc1.weight": EXPERT_FC1,
    "mlp.experts.experts.linear_fc2.weight": EXPERT_FC2,
}
_LOCAL_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.weight$")
_GROUPED_EXPERT = re.compile(r"^mlp\.experts\.(linear_fc[12])\.weight(\d+)$")


def expert_param(suffix: str) -> tuple[int, str] | None:
    """(expert index, ``linear_fc1``/``linear_fc2``) of a per-expert megatron parameter name
    (layer-local, SequentialMLP or TEGroupedMLP spelling); None for any other name."""
    if match := _LOCAL_EXPERT.match(suffix):
        return int(match.group(1)), match.group(2)
    if match := _GROUPED_EXPERT.match(suffix):
        return int(match.group(2)), match.group(1)
    return None


def expert_param_name(index: int, which: str) -> str:
    """SequentialMLP's layer-local name of expert ``index``'s ``which`` weight."""
    return f"mlp.experts.local_experts.{index}.{which}.weight"


def experts_to_hf(index: int, which: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """One expert's full megatron weight -> its HF tensors (layer-local names):
    ``linear_fc1`` [2I, H] -> gate_proj, up_proj [I, H]; ``linear_fc2`` [H, I] -> down_proj."""
    if which == EXPERT_FC1:
        gate, up = split_gate_up(tensor)
        return {HF_EXPERT_GATE_UP[0].format(index): gate, HF_EXPERT_GATE_UP[1].format(index): up}
    return {HF_EXPERT_DOWN.format(index): tensor}


# Buffers some older HF checkpoints carry; recomputed from the config, never converted.
_IGNORED_HF = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def tp_block(full: torch.Tensor, *, dim: int, tp_rank: int, tp: int) -> torch.Tensor:
    """This rank's contiguous 1/tp block of ``full`` along ``dim`` (megatron's TP split)."""
    size = full.shape[dim]
    if size % tp:
        raise ValueError(f"dimension {dim} of size {size} does not split over TP={tp}")
    return full.narrow(dim, tp_rank * (size // tp), size // tp)


def fuse_gate_up_shard(
    gate: torch.Tensor, up: torch.Tensor, *, tp_rank: int, tp: int
) -> torch.Tensor:
    """Local SwiGLU ``linear_fc1`` shard: [gate_shard; up_shard], each [F/tp, H]."""
    return torch.cat(
        [tp_block(gate, dim=0, tp_rank=tp_rank, tp=tp), tp_block(up, dim=0, tp_rank=tp_rank, tp=tp)]
    )


def split_gate_up(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A checkpoint's full ``linear_fc1`` [2F, H] is [gate; up] (megatron's SwiGLU factory
    saves each TP shard's halves at their global offsets) -> (gate [F, H], up [F, H])."""
    gate, up = fc1.chunk(2, dim=0)
    return gate.contiguous(), up.contiguous()


def padded_vocab_size(vocab_size: int, *, tp: int) -> int:
    """Smallest multiple of ``tp`` >= ``vocab_size`` (megatron splits the vocab evenly over TP).

    Padding rows are zeros; the checkpoint's embedding and output layer load at any other
    padding (megatron marks them ``allow_shape_mismatch``) and export trims them off.
    """
    return -(-vocab_size // tp) * tp


def hf_layer_name(layer: int, suffix: str) -> str:
    return HF_LAYER_PREFIX.format(layer) + suffix


def hf_layer_shapes(arch: HFArchitecture) -> dict[str, tuple[int, ...]]:
    """Layer-local HF tensor name -> shape, in the order HF models define them."""
    hidden, ffn, d = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim
    q_rows, kv_rows = arch.num_attention_heads * d, arch.num_query_groups * d
    shapes: dict[str, tuple[int, ...]] = {
        "input_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (q_rows, hidden),
        "self_attn.k_proj.weight": (kv_rows, hidden),
        "self_attn.v_proj.weight": (kv_rows, hidden),
    }
    if arch.qkv_bias:
        shapes.update(
            {
                "self_attn.q_proj.bias": (q_rows,),
                "self_attn.k_proj.bias": (kv_rows,),
                "self_attn.v_proj.bias": (kv_rows,),
            }
        )
    shapes["self_attn.o_proj.weight"] = (hidden, q_rows)
    if arch.qk_layernorm:
        shapes.update({"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)})
    shapes["post_attention_layernorm.weight"] = (hidden,)
    if arch.is_moe:
        inner = arch.moe_ffn_hidden_size
        shapes[HF_ROUTER] = (arch.num_experts, hidden)
        for expert in range(arch.num_experts):
            shapes[HF_EXPERT_GATE_UP[0].format(expert)] = (inner, hidden)
            shapes[HF_EXPERT_GATE_UP[1].format(expert)] = (inner, hidden)
            shapes[HF_EXPERT_DOWN.format(expert)] = (hidden, inner)
        return shapes
    shapes.update(
        {
            "mlp.gate_proj.weight": (ffn, hidden),
            "mlp.up_proj.weight": (ffn, hidden),
            "mlp.down_proj.weight": (hidden, ffn),
        }
    )
    return shapes


def expected_hf_shapes(arch: HFArchitecture) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF checkpoint of ``arch`` holds, with its shape (``lm_head`` only when
    untied)."""
    vocab_by_hidden = (arch.vocab_size, arch.hidden_size)
    shapes = {HF_EMBEDDING: vocab_by_hidden}
    for layer in range(arch.num_layers):
        shapes.update(
            {hf_layer_name(layer, s): shape for s, shape in hf_layer_shapes(arch).items()}
        )
    shapes[HF_FINAL_NORM] = (arch.hidden_size,)
    if not arch.tie_word_embeddings:
        shapes[HF_LM_HEAD] = vocab_by_hidden
    return shapes


def check_hf_tensors(
    shapes: dict[str, tuple[int, ...]], *, arch: HFArchitecture, source: str
) -> None:
    """Raises ValueError when a checkpoint's tensors {name: shape} do not match ``arch``:
    a tensor missing or of another shape, or one with no place in the megatron model (which
    would otherwise be dropped silently)."""
    expected = expected_hf_shapes(arch)
    missing = [n for n in expected if n not in shapes]
    if missing:
        raise UserError(
            f"{source}: {len(missing)} tensor(s) the config implies are missing, e.g. "
            f"{missing[:3]}; the weights do not match config.json"
        )
    for name, shape in expected.items():
        if tuple(shapes[name]) != shape:
            raise UserError(
                f"{source}: {name} has shape {tuple(shapes[name])} but config.json implies "
                f"{shape}; the weights do not match config.json"
            )
    allowed = set(expected) | {HF_LM_HEAD}  # tied checkpoints may still store lm_head
    extra = sorted(n for n in set(shapes) - allowed if not _IGNORED_HF.search(n))
    if extra:
        raise UserError(
            f"{source}: tensor(s) with no place in the megatron model: {extra[:3]}"
            f"{' ...' if len(extra) > 3 else ''}; this converter maps Qwen3/Qwen3-MoE/Qwen2/Llama "
            "without o_proj or MLP biases"
        )


def check_representable(hf: dict[str, Any], *, source: str) -> None:
    """Config fields :func:`parse_hf_config` accepts but megatron's GPT cannot hold exactly.

    megatron's ``add_qkv_bias`` adds biases to q/k/v only; HF ``attention_bias`` on Llama and
    Qwen3 also biases o_proj, and ``mlp_bias`` biases the MLP.
    """
    model_type = hf.get("model_type")
    if model_type in ("llama", "qwen3") and hf.get("attention_bias"):
        raise UserError(
            f"{source}: attention_bias=true on {model_type} also adds an o_proj bias, which "
            "megatron's GPT layer cannot hold; only attention_bias=false converts"
        )
    if hf.get("mlp_bias"):
        raise UserError(f"{source}: mlp_bias=true cannot be mapped; only mlp_bias=false converts")


def check_rope_parsed(hf: dict[str, Any], arch: HFArchitecture, *, source: str) -> None:
    """Raises ValueError when a transformers-5 ``rope_parameters`` block disagrees with what
    :func:`parse_hf_config` read (it reads the older top-level ``rope_theta``/``rope_scaling``);
    a silently wrong RoPE base would give a model that loads but computes something else."""
    params = hf.get("rope_parameters")
    if not isinstance(params, dict):
        return
    theta = params.get("rope_theta")
    if theta is not None and float(theta) != arch.rotary_base:
        raise UserError(
            f"{source}: rope_parameters.rope_theta={theta} but the config was read with "
            f'rope_theta={arch.rotary_base}; add "rope_theta": {theta} at the top level of '
            "config.json"
        )
    kind = params.get("rope_type", "default")
    if kind != "default" and arch.llama3_rope_scaling is None:
        raise UserError(
            f"{source}: rope_parameters.rope_type={kind!r} was not read; only llama3 scaling "
            "maps, given as a top-level rope_scaling block"
        )


def strip_checkpoint_prefix(key: str) -> str | None:
    """A checkpoint key without the DDP ``module.`` prefix; None for non-model keys
    (optimizer state, which also names model parameters inside its keys)."""
    while key.startswith(CHECKPOINT_PREFIX):
        key = key[len(CHECKPOINT_PREFIX) :]
    if key.startswith((MCORE_LAYER_PREFIX, "embedding.", "decoder.", "output_layer.")):
        return key
    return None


def layer_to_hf(
    tensors: dict[str, torch.Tensor],
    *,
    layer: int,
    arch: HFArchitecture,
    first_expert: int = 0,
    complete: bool = True,
) -> dict[str, torch.Tensor]:
    """One layer's megatron tensors {layer-local suffix: full tensor} -> {HF name: tensor}.

    MoE experts come either stacked as checkpoints hold them (``mlp.experts.experts.
    linear_fc1.weight`` [E_chunk, 2I, H], experts ``first_expert``.. of the layer) or one per
    parameter name with its global index (``mlp.experts.local_experts.{e}.linear_fc1.weight``).
    ``complete``: the tensors are the whole layer (checked against config.json); False for
    a part of it (a chunk of experts), whose shapes are still checked.
    """
    layout = QKVLayout.from_hf(arch)
    out: dict[str, torch.Tensor] = {}
    for suffix, tensor in tensors.items():
        if suffix == MCORE_ROUTER:
            parts = {HF_ROUTER: tensor}
        elif suffix in STACKED_EXPERTS:
            parts = {}
            for offset, expert in enumerate(tensor):
                parts.update(experts_to_hf(first_expert + offset, STACKED_EXPERTS[suffix], expert))
        elif (expert := expert_param(suffix)) is not None:
            parts = experts_to_hf(*expert, tensor)
        elif suffix in NORMS:
            parts = {NORMS[suffix]: tensor}
        elif suffix in ROW_PARALLEL:
            parts = {ROW_PARALLEL[suffix]: tensor}
        elif suffix in QKV:
            parts = dict(zip(QKV[suffix], layout.unfuse(tensor)))
        elif suffix in GATE_UP:
            parts = dict(zip(GATE_UP[suffix], split_gate_up(tensor)))
        else:
            raise UserError(
                f"checkpoint tensor decoder.layers.{suffix} has no Hugging Face name in "
                "models/hf_weights/mapping.py"
            )
        out.update(parts)
    expected = hf_layer_shapes(arch)
    if (set(out) != set(expected)) if complete else not set(out) <= set(expected):
        raise UserError(
            f"layer {layer}: checkpoint gives {sorted(out)[:6]}..., config.json implies "
            f"{list(expected)[:6]}...; pass the source model's --hf-dir"
        )
    for suffix, shape in expected.items():
        if suffix in out and tuple(out[suffix].shape) != shape:
            raise UserError(
                f"layer {layer}: {suffix} comes out {tuple(out[suffix].shape)} from the "
                f"checkpoint but config.json implies {shape}; pass the source model's --hf-dir"
            )
    return {hf_layer_name(layer, s): out[s] for s in expected if s in out}
