"""Shape of a dense Qwen3-style decoder and its parameter count, as plain arithmetic.

The planner never builds a model: everything it needs is in :class:`ModelSpec`. The presets
are the official Hugging Face ``config.json`` values of the Qwen3 base models; any other model
training can build (Qwen3, Qwen2, Llama) is read from its own ``config.json`` with
:func:`load_hf_config`, through ``models/hf_config.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_longact.errors import UserError
from megatron_longact.models.hf_config import parse_hf_config, read_hf_config


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Shape of a dense pre-norm decoder with GQA, SwiGLU MLP, RMSNorm and Q/K norm (Qwen3).

    Attributes:
        name: label for tables and error messages.
        hidden_size: residual stream width h.
        num_layers: transformer layers L.
        num_attention_heads: query heads a.
        num_kv_heads: key/value heads (GQA groups) g; equals a for plain multi-head attention.
        head_dim: per-head width d; the query projection is a*d wide, which Qwen3 does not tie
            to h (Qwen3-4B: a*d = 4096 > h = 2560).
        ffn_hidden_size: SwiGLU inner width f (gate and up are f wide each).
        vocab_size: tokenizer vocabulary V, before megatron pads it for TP.
        tied_embeddings: output layer shares the input embedding matrix.
        qk_norm: per-head RMSNorm on q and k (Qwen3), d weights each.
    """

    name: str
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    tied_embeddings: bool
    qk_norm: bool = True
    num_experts: int = 0
    """MoE (Qwen3-MoE): routed experts per layer, every layer sparse; 0 for a dense model."""
    moe_ffn_hidden_size: int = 0
    """MoE: SwiGLU inner width of one expert."""
    moe_router_topk: int = 0
    """MoE: experts per token."""

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def query_width(self) -> int:
        """Width of the query projection output, a*d."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        """Width of each of the key and value projection outputs, g*d."""
        return self.num_kv_heads * self.head_dim


# Official config.json values (huggingface.co/Qwen/Qwen3-{4B,8B,32B}-Base; the chat models share
# the shapes). Published sizes: 4.0B, 8.2B, 32.8B parameters.
QWEN3_4B = ModelSpec(
    name="qwen3-4b",
    hidden_size=2560,
    num_layers=36,
    num_attention_heads=32,
    num_kv_heads=8,
    head_dim=128,
    ffn_hidden_size=9728,
    vocab_size=151936,
    tied_embeddings=True,
)
QWEN3_8B = ModelSpec(
    name="qwen3-8b",
    hidden_size=4096,
    num_layers=36,
    num_attention_heads=32,
    num_kv_heads=8,
    head_dim=128,
    ffn_hidden_size=12288,
    vocab_size=151936,
    tied_embeddings=False,
)
QWEN3_32B = ModelSpec(
    name="qwen3-32b",
    hidden_size=5120,
    num_layers=64,
    num_attention_heads=64,
    num_kv_heads=8,
    head_dim=128,
    ffn_hidden_size=25600,
    vocab_size=151936,
    tied_embeddings=False,
)
# Past 32B: official config.json values of huggingface.co/Qwen/Qwen3-30B-A3B and
# Qwen3-235B-A22B (published 30.5B / 235B total, 3.3B / 22B active) and of
# meta-llama/Llama-3.1-70B (70.6B; no Q/K norm).
QWEN3_30B_A3B = ModelSpec(
    name="qwen3-30b-a3b",
    hidden_size=2048,
    num_layers=48,
    num_attention_heads=32,
    num_kv_heads=4,
    head_dim=128,
    ffn_hidden_size=6144,
    vocab_size=151936,
    tied_embeddings=False,
    num_experts=128,
    moe_ffn_hidden_size=768,
    moe_router_topk=8,
)
QWEN3_235B_A22B = ModelSpec(
    name="qwen3-235b-a22b",
    hidden_size=4096,
    num_layers=94,
    num_attention_heads=64,
    num_kv_heads=4,
    head_dim=128,
    ffn_hidden_size=12288,
    vocab_size=151936,
    tied_embeddings=False,
    num_experts=128,
    moe_ffn_hidden_size=1536,
    moe_router_topk=8,
)
LLAMA31_70B = ModelSpec(
    name="llama3.1-70b",
    hidden_size=8192,
    num_layers=80,
    num_attention_heads=64,
    num_kv_heads=8,
    head_dim=128,
    ffn_hidden_size=28672,
    vocab_size=128256,
    tied_embeddings=False,
    qk_norm=False,
)
PRESETS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (QWEN3_4B, QWEN3_8B, QWEN3_32B, QWEN3_30B_A3B, QWEN3_235B_A22B, LLAMA31_70B)
}


def get_preset(name: str) -> ModelSpec:
    """Return the preset called ``name`` (case-insensitive), e.g. ``"qwen3-8b"``."""
    key = name.strip().lower()
    if key not in PRESETS:
        raise UserError(
            f"unknown model preset {name!r}; choose one of {sorted(PRESETS)} "
            "or pass the model's Hugging Face config.json"
        )
    return PRESETS[key]


def load_hf_config(path: str | Path) -> ModelSpec:
    """Read a model's shape from a Hugging Face ``config.json`` (or its directory).

    Read and validated by ``models/hf_config.py``, as the model builder and the converter do,
    so the planner accepts exactly the models training can build (Qwen3, Qwen2, Llama; dense):
    ``num_key_value_heads`` defaults to the head count, ``head_dim`` to
    ``hidden_size // num_attention_heads`` and ``tie_word_embeddings`` to False, as in
    transformers.
    """
    config_path = Path(path)
    if config_path.is_dir():
        config_path = config_path / "config.json"
    raw = read_hf_config(config_path)
    arch = parse_hf_config(raw, source=str(config_path))
    return ModelSpec(
        name=str(raw.get("_name_or_path") or config_path.parent.name or "hf-model"),
        hidden_size=arch.hidden_size,
        num_layers=arch.num_layers,
        num_attention_heads=arch.num_attention_heads,
        num_kv_heads=arch.num_query_groups,
        head_dim=arch.head_dim,
        ffn_hidden_size=arch.ffn_hidden_size,
        vocab_size=arch.vocab_size,
        tied_embeddings=arch.tie_word_embeddings,
        qk_norm=arch.qk_layernorm,
        num_experts=arch.num_experts,
        moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
        moe_router_topk=arch.moe_router_topk,
    )


def layer_parameters(spec: ModelSpec) -> int:
    """Parameters of one transformer layer: attention, SwiGLU MLP (MoE: experts and router)
    and the norms.

    qkv ``h*(a*d + 2*g*d)`` + output projection ``a*d*h`` + MLP ``3*h*f`` (gate, up, down)
    + two RMSNorms ``2*h`` + Q/K norms ``2*d``. No biases (Qwen3 has none).
    """
    h = spec.hidden_size
    attention = h * (spec.query_width + 2 * spec.kv_width) + spec.query_width * h
    mlp = (
        expert_layer_parameters(spec) + spec.num_experts * h
        if spec.is_moe
        else 3 * h * spec.ffn_hidden_size
    )
    norms = 2 * h + (2 * spec.head_dim if spec.qk_norm else 0)
    return attention + mlp + norms


def expert_layer_parameters(spec: ModelSpec) -> int:
    """Parameters of one MoE layer's routed experts (gate, up, down each); 0 for dense."""
    return spec.num_experts * 3 * spec.hidden_size * spec.moe_ffn_hidden_size


def active_parameters(spec: ModelSpec) -> int:
    """Parameters a token passes through (MoE: top-k experts of each layer)."""
    inactive = spec.num_layers * expert_layer_parameters(spec)
    if spec.is_moe:
        inactive -= (
            spec.num_layers
            * spec.moe_router_topk
            * 3
            * spec.hidden_size
            * (spec.moe_ffn_hidden_size)
        )
    return count_parameters(spec) - inactive


def embedding_parameters(spec: ModelSpec, *, vocab_size: int | None = None) -> int:
    """Parameters of one vocab x hidden matrix (input embedding or output layer)."""
    return (vocab_size if vocab_size is not None else spec.vocab_size) * spec.hidden_size


def count_parameters(spec: ModelSpec) -> int:
    """Total parameters as published (unpadded vocabulary, tied matrix counted once)."""
    embeddings = embedding_parameters(spec) * (1 if spec.tied_embeddings else 2)
    final_norm = spec.hidden_size
    return spec.num_layers * layer_parameters(spec) + embeddings + final_norm
