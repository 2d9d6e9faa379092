"""Map a Hugging Face ``config.json`` (Qwen3, Qwen3-MoE, Qwen2, Llama) onto megatron-core's config.

Pure data, importable without torch or megatron (``transformer_config_kwargs`` imports torch
when called): :func:`read_hf_config` and :func:`parse_hf_config` are the one reader and the one
validation of a ``config.json`` for the model builder (``models/gpt.py``), the converter
(``convert/``) and the planner (``plan/model_spec.py``), so all three accept the same models
and read the same shapes; the builder turns :class:`HFArchitecture` into plain dicts of
``TransformerConfig`` and ``GPTModel`` keyword arguments here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_longact.errors import UserError

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets" / "models"

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen3_moe", "qwen2", "llama")
MOE_MODEL_TYPES = ("qwen3_moe",)


@dataclass(frozen=True, kw_only=True)
class HFArchitecture:
    """The architecture facts megatron needs, read from an HF config.

    Shapes: ``num_attention_heads * head_dim`` need not equal ``hidden_size`` (Qwen3 decouples
    them), so ``kv_channels`` is always set explicitly.
    """

    model_type: str
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rotary_base: float
    norm_epsilon: float
    tie_word_embeddings: bool
    qk_layernorm: bool
    qkv_bias: bool
    llama3_rope_scaling: float | None
    num_experts: int = 0
    """Routed experts per MoE layer (every layer is MoE when > 0; 0 for dense models)."""
    moe_ffn_hidden_size: int = 0
    """SwiGLU inner width of one expert (HF ``moe_intermediate_size``)."""
    moe_router_topk: int = 0
    """Experts each token is sent to (HF ``num_experts_per_tok``)."""
    moe_norm_topk_prob: bool = False
    """Renormalise the top-k routing probabilities to sum to 1 (HF ``norm_topk_prob``)."""
    router_aux_loss_coef: float = 0.0
    """The HF config's load-balancing loss coefficient (``router_aux_loss_coef``); the run's
    coefficient is ``model.moe_aux_loss_coeff`` when set (see ``models/moe.py``)."""

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0


def resolve_model_dir(*, hf_path: str | None, preset: str) -> Path:
    """The folder whose ``config.json`` describes the model (a user path or a shipped preset)."""
    if hf_path is not None:
        path = Path(hf_path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model.hf_path={hf_path}: no config.json there; point it at a local Hugging Face "
                "model folder (nothing is downloaded)"
            )
        return path
    path = ASSETS_DIR / preset
    if not (path / "config.json").is_file():
        names = sorted(p.name for p in ASSETS_DIR.iterdir() if (p / "config.json").is_file())
        raise UserError(f"model.preset={preset!r} is not shipped; choose one of {names}")
    return path


def read_hf_config(model_dir: str | Path) -> dict[str, Any]:
    """Loads ``<model_dir>/config.json`` (or ``model_dir`` itself when it is a file) as a dict.

    Raises:
        FileNotFoundError: no such file, naming it.
        ValueError: naming the file, when it is not valid JSON or not a JSON object.
    """
    path = Path(model_dir)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no Hugging Face config at {path}; pass the model folder or its config.json"
        )
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(hf, dict):
        raise UserError(f"{path}: expected a JSON object at the top level")
    return hf


def parse_hf_config(hf: dict[str, Any], *, source: str = "config.json") -> HFArchitecture:
    """Validates an HF config dict and extracts :class:`HFArchitecture`.

    Raises:
        ValueError: naming ``source`` and the field, for a missing or non-positive size, or
            model types or features this mapping cannot represent (MoE, sliding window,
            non-llama3 rope scaling, non-SiLU MLPs).
    """
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"{source}: model_type={model_type!r} cannot be mapped; supported: "
            f"{list(SUPPORTED_MODEL_TYPES)}"
        )

    def size(key: str) -> int:
        value = hf[key]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UserError(f"{source}: field '{key}' must be a positive integer, got {value!r}")
        return value

    def need(key: str) -> int:
        if key not in hf:
            raise UserError(f"{source}: missing field '{key}' required for {model_type}")
        return size(key)

    def optional(key: str, default: int) -> int:
        # transformers treats an absent key and null alike.
        return size(key) if hf.get(key) is not None else default

    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"{source}: hidden_act={hf['hidden_act']!r}; only silu (SwiGLU) maps")
    if hf.get("use_sliding_window"):
        raise UserError(f"{source}: use_sliding_window=true cannot be mapped; set it false")
    if model_type not in MOE_MODEL_TYPES and (hf.get("num_experts") or hf.get("num_local_experts")):
        raise UserError(
            f"{source}: mixture-of-experts fields on model_type={model_type!r}; only "
            f"{list(MOE_MODEL_TYPES)} MoE configs map"
        )
    scaling = hf.get("rope_scaling")
    params = hf.get("rope_parameters") or {}
    if not scaling and params.get("rope_type", "default") != "default":
        scaling = params
    llama3_factor = None
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "llama3":
            raise UserError(f"{source}: rope_scaling type {kind!r} cannot be mapped (llama3 only)")
        llama3_factor = float(scaling["factor"])
    heads = need("num_attention_heads")
    hidden = need("hidden_size")
    return HFArchitecture(
        model_type=model_type,
        hidden_size=hidden,
        ffn_hidden_size=need("intermediate_size"),
        num_layers=need("num_hidden_layers"),
        num_attention_heads=heads,
        num_query_groups=optional("num_key_value_heads", heads),
        head_dim=optional("head_dim", hidden // heads),
        vocab_size=need("vocab_size"),
        max_position_embeddings=need("max_position_embeddings"),
        rotary_base=_rope_theta(hf),
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qk_layernorm=model_type in ("qwen3", "qwen3_moe"),
        # Qwen2 always has q/k/v biases; Llama and Qwen3 only with attention_bias=true.
        qkv_bias=True if model_type == "qwen2" else bool(hf.get("attention_bias", False)),
        llama3_rope_scaling=llama3_factor,
        **(_moe_fields(hf, source=source, size=size) if model_type in MOE_MODEL_TYPES else {}),
    )


def _moe_fields(hf: dict[str, Any], *, source: str, size) -> dict[str, Any]:
    """HFArchitecture's MoE fields of a ``qwen3_moe`` config.

    transformers' Qwen3-MoE (``models/qwen3_moe/modeling_qwen3_moe.py``, 5.x): every layer
    ``i`` with ``i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0`` is sparse
    (~308-309); the router is a bias-free linear, softmax over all experts in fp32, top-k, then
    optionally renormalised by ``norm_topk_prob`` (``Qwen3MoeTopKRouter.forward`` ~258-266); no
    shared experts. Hub configs name the expert count ``num_experts``; transformers 5's
    ``save_pretrained`` writes it as ``num_local_experts`` (its attribute map), so both are read.
    """
    experts_key = "num_experts" if hf.get("num_experts") is not None else "num_local_experts"
    if hf.get(experts_key) is None:
        raise UserError(f"{source}: missing field 'num_experts' required for qwen3_moe")
    if hf.get("mlp_only_layers"):
        raise UserError(
            f"{source}: mlp_only_layers={hf['mlp_only_layers']} (dense layers among MoE ones) "
            "cannot be mapped; only all-MoE models (mlp_only_layers=[]) convert"
        )
    if hf.get("decoder_sparse_step", 1) != 1:
        raise UserError(
            f"{source}: decoder_sparse_step={hf['decoder_sparse_step']} cannot be mapped; only "
            "decoder_sparse_step=1 (every layer MoE) converts"
        )
    if hf.get("shared_expert_intermediate_size"):
        raise UserError(f"{source}: shared experts cannot be mapped (Qwen3-MoE has none)")
    experts, topk = size(experts_key), size("num_experts_per_tok")
    if topk > experts:
        raise UserError(f"{source}: num_experts_per_tok={topk} exceeds {experts_key}={experts}")
    return {
        "num_experts": experts,
        "moe_ffn_hidden_size": size("moe_intermediate_size"),
        "moe_router_topk": topk,
        "moe_norm_topk_prob": bool(hf.get("norm_topk_prob", False)),
        "router_aux_loss_coef": float(hf.get("router_aux_loss_coef", 0.001)),
    }


def _rope_theta(hf: dict[str, Any]) -> float:
    # transformers >= 5 writes rope_parameters: {rope_theta: ...}; older configs a top-level key.
    params = hf.get("rope_parameters") or {}
    return float(hf.get("rope_theta", params.get("rope_theta", 10000.0)))


def transformer_config_kwargs(arch: HFArchitecture) -> dict[str, Any]:
    """``TransformerConfig`` fields that describe the architecture (no parallelism/precision).

    The MLP is SwiGLU: ``gated_linear_unit`` with SiLU (megatron's default activation is GELU).
    """
    import torch

    return {
        "activation_func": torch.nn.functional.silu,
        "num_layers": arch.num_layers,
        "hidden_size": arch.hidden_size,
        "ffn_hidden_size": arch.ffn_hidden_size,
        "num_attention_heads": arch.num_attention_heads,
        "num_query_groups": arch.num_query_groups,
        "kv_channels": arch.head_dim,
        "normalization": "RMSNorm",
        "layernorm_epsilon": arch.norm_epsilon,
        "gated_linear_unit": True,
        "add_bias_linear": False,
        "add_qkv_bias": arch.qkv_bias,
        "qk_layernorm": arch.qk_layernorm,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
    }


def gpt_model_kwargs(
    arch: HFArchitecture, *, max_position_embeddings: int | None
) -> dict[str, Any]:
    """``GPTModel`` constructor arguments other than config and layer spec."""
    kwargs: dict[str, Any] = {
        "vocab_size": arch.vocab_size,
        "max_sequence_length": max_position_embeddings or arch.max_position_embeddings,
        "position_embedding_type": "rope",
        "rotary_base": int(arch.rotary_base),
        "share_embeddings_and_output_weights": arch.tie_word_embeddings,
    }
    if arch.llama3_rope_scaling is not None:
        kwargs["rope_scaling"] = True
        kwargs["rope_scaling_factor"] = arch.llama3_rope_scaling
    return kwargs
