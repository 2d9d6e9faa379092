"""Shape of a dense Qwen3-style decoder and its parameter count, as plain arithmetic.

The planner never builds a model: everything it needs is in :class:`ModelSpec`. The presets
are the official Hugging Face ``config.json`` values of the Qwen3 base models; any other dense
Qwen3/Llama-style model can be read from its own ``config.json`` with :func:`load_hf_config`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


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
PRESETS: dict[str, ModelSpec] = {spec.name: spec for spec in (QWEN3_4B, QWEN3_8B, QWEN3_32B)}


def get_preset(name: str) -> ModelSpec:
    """Return the preset called ``name`` (case-insensitive), e.g. ``"qwen3-8b"``."""
    key = name.strip().lower()
    if key not in PRESETS:
        raise ValueError(
            f"unknown model preset {name!r}; choose one of {sorted(PRESETS)} "
            "or pass the model's Hugging Face config.json"
        )
    return PRESETS[key]


def load_hf_config(path: str | Path) -> ModelSpec:
    """Read a dense decoder's shape from a Hugging Face ``config.json`` (or its directory).

    ``num_key_value_heads`` defaults to the head count and ``head_dim`` to
    ``hidden_size // num_attention_heads`` as in transformers; ``tie_word_embeddings`` defaults
    to False as in ``Qwen3Config``. Mixture-of-experts configs are rejected.
    """
    config_path = Path(path)
    if config_path.is_dir():
        config_path = config_path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"no Hugging Face config at {config_path}; pass the model directory or its config.json"
        )
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path}: not valid JSON ({err})") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{config_path}: expected a JSON object at the top level")
    if raw.get("num_experts") or raw.get("num_local_experts"):
        raise ValueError(
            f"{config_path}: mixture-of-experts models are not modelled by the planner "
            "(it assumes one dense MLP per layer)"
        )

    def required(key: str) -> int:
        if key not in raw:
            raise ValueError(f"{config_path}: missing field {key!r} needed by the planner")
        value = raw[key]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(
                f"{config_path}: field {key!r} must be a positive integer, got {value!r}"
            )
        return value

    hidden = required("hidden_size")
    heads = required("num_attention_heads")
    kv_heads = required("num_key_value_heads") if "num_key_value_heads" in raw else heads
    head_dim = required("head_dim") if raw.get("head_dim") is not None else hidden // heads
    return ModelSpec(
        name=str(raw.get("_name_or_path") or config_path.parent.name or "hf-model"),
        hidden_size=hidden,
        num_layers=required("num_hidden_layers"),
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        ffn_hidden_size=required("intermediate_size"),
        vocab_size=required("vocab_size"),
        tied_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qk_norm=str(raw.get("model_type", "qwen3")).startswith("qwen3"),
    )


def layer_parameters(spec: ModelSpec) -> int:
    """Parameters of one transformer layer: attention, SwiGLU MLP and the norms.

    qkv ``h*(a*d + 2*g*d)`` + output projection ``a*d*h`` + MLP ``3*h*f`` (gate, up, down)
    + two RMSNorms ``2*h`` + Q/K norms ``2*d``. No biases (Qwen3 has none).
    """
    h = spec.hidden_size
    attention = h * (spec.query_width + 2 * spec.kv_width) + spec.query_width * h
    mlp = 3 * h * spec.ffn_hidden_size
    norms = 2 * h + (2 * spec.head_dim if spec.qk_norm else 0)
    return attention + mlp + norms


def embedding_parameters(spec: ModelSpec, *, vocab_size: int | None = None) -> int:
    """Parameters of one vocab x hidden matrix (input embedding or output layer)."""
    return (vocab_size if vocab_size is not None else spec.vocab_size) * spec.hidden_size


def count_parameters(spec: ModelSpec) -> int:
    """Total parameters as published (unpadded vocabulary, tied matrix counted once)."""
    embeddings = embedding_parameters(spec) * (1 if spec.tied_embeddings else 2)
    final_norm = spec.hidden_size
    return spec.num_layers * layer_parameters(spec) + embeddings + final_norm
