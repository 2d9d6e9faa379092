"""Build megatron-core's ``GPTModel`` from a Hugging Face config.

Transformer Engine's layer spec when TE imports and CUDA is present (ring-attention context
parallel, THD packing); megatron's local spec otherwise, with a core attention from
:mod:`models.cp_attention` that takes packed THD rows (all-gather K/V attention when context
parallel is on, docs/context_parallel.md; megatron's own kernel per packed segment without).
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_longact.config.schema import ModelConfig, ParallelConfig, TrainConfig
from megatron_longact.device import current_device, on_cuda
from megatron_longact.errors import UserError
from megatron_longact.models.hf_config import (
    HFArchitecture,
    gpt_model_kwargs,
    parse_hf_config,
    read_hf_config,
    resolve_model_dir,
    transformer_config_kwargs,
)
from megatron_longact.models.moe import moe_transformer_config_kwargs


def load_architecture(model: ModelConfig) -> HFArchitecture:
    """Reads and validates the HF config that ``model`` points at."""
    model_dir = resolve_model_dir(hf_path=model.hf_path, preset=model.preset)
    return parse_hf_config(read_hf_config(model_dir), source=str(model_dir / "config.json"))


def resolve_dtype(precision: str) -> torch.dtype:
    """``auto`` -> bf16 with CUDA, fp32 without (CPU kernels for bf16 training are slow)."""
    if precision == "auto":
        return torch.bfloat16 if on_cuda() else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]


def use_transformer_engine(model: ModelConfig) -> bool:
    """Whether to build with TE modules (errors if ``te`` is asked for and unavailable).

    TE is imported only where it could be used: on CUDA and unless ``local`` is configured.
    """
    te_ok = False
    if on_cuda() and model.attention_backend != "local":
        try:
            import transformer_engine  # noqa: F401

            te_ok = True
        except ImportError:
            pass
    if model.attention_backend == "te" and not te_ok:
        raise UserError(
            "model.attention_backend=te needs CUDA and transformer-engine "
            "(pip install -e '.[gpu]'); use auto or local"
        )
    return te_ok and model.attention_backend != "local"


def _device_settings(*, use_te: bool) -> dict[str, bool]:
    """TransformerConfig settings that depend on the device and on TE (megatron-core 0.16.1).

    CPU: everything unfused (megatron's unfused paths are exact there), weights initialised on
    the CPU, no batched p2p (it calls ``torch.cuda.synchronize``; plain isend/irecv works on
    gloo). CUDA: GPU initialisation, megatron's own jit bias-dropout fusion, pipeline outputs
    freed after send; with TE also its fused RoPE (``transformer_config.py`` ~1530-1551 needs
    TE >= 1.4), its fused weight-gradient accumulation into ``main_grad`` (megatron's local
    linears need apex for it) and masked-softmax fusion (unused by TE's attention).
    """
    if not on_cuda():
        return dict(use_cpu_initialization=True, masked_softmax_fusion=False,
                    bias_dropout_fusion=False, apply_rope_fusion=False,
                    gradient_accumulation_fusion=False, deallocate_pipeline_outputs=False,
                    batch_p2p_comm=False)  # fmt: skip
    return dict(use_cpu_initialization=False, masked_softmax_fusion=use_te,
                bias_dropout_fusion=True, apply_rope_fusion=use_te,
                gradient_accumulation_fusion=use_te, deallocate_pipeline_outputs=True)  # fmt: skip


def make_transformer_config(
    arch: HFArchitecture,
    *,
    model: ModelConfig,
    parallel: ParallelConfig,
    train: TrainConfig,
    extra: dict[str, Any] | None = None,
):
    """``TransformerConfig`` for ``arch`` with the run's parallelism, precision and recompute.

    ``calculate_per_token_loss`` is on: loss functions return (sum, count) and megatron divides
    gradients by the global count (all-reduced over DP x CP), so micro-batching and DP never
    change the effective loss normalisation.
    """
    from megatron.core.transformer import TransformerConfig

    dtype = resolve_dtype(train.precision)
    if arch.num_attention_heads % parallel.tensor_model_parallel_size:
        raise UserError(
            f"num_attention_heads={arch.num_attention_heads} is not divisible by "
            f"parallel.tensor_model_parallel_size={parallel.tensor_model_parallel_size}"
        )
    if arch.num_layers % parallel.pipeline_model_parallel_size:
        raise UserError(
            f"num_hidden_layers={arch.num_layers} is not divisible by "
            f"parallel.pipeline_model_parallel_size={parallel.pipeline_model_parallel_size}"
        )
    stages = parallel.pipeline_model_parallel_size * parallel.num_model_chunks
    if parallel.num_model_chunks > 1 and arch.num_layers % stages:
        # megatron asserts it deep in TransformerConfig.__post_init__ (~1471, 0.16.1).
        raise UserError(
            f"num_hidden_layers={arch.num_layers} is not divisible by "
            f"parallel.pipeline_model_parallel_size x virtual_pipeline_model_parallel_size = "
            f"{stages}; pick sizes whose product divides {arch.num_layers}"
        )
    kwargs = transformer_config_kwargs(arch)
    kwargs.update(
        moe_transformer_config_kwargs(
            arch, model=model, parallel=parallel, use_te=use_transformer_engine(model)
        )
    )
    kwargs.update(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        init_method_std=model.init_method_std,
        calculate_per_token_loss=True,
        # Apex's persistent layer norm is never installed here (NVIDIA apex is optional).
        persist_layer_norm=False,
        **_device_settings(use_te=use_transformer_engine(model)),
    )
    if train.recompute == "full":
        kwargs.update(
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
        )
    elif train.recompute == "selective":
        kwargs.update(recompute_granularity="selective")
    kwargs.update(extra or {})
    return TransformerConfig(**kwargs)


def build_gpt_model(
    arch: HFArchitecture,
    transformer_config,
    *,
    model: ModelConfig,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
):
    """One ``GPTModel`` chunk (this rank's pipeline stage), parameters in ``params_dtype``.

    ``vp_stage``: which of this rank's virtual pipeline chunks (None without virtual stages);
    megatron derives the chunk's global layer numbers from it (``transformer_layer.py``
    ``get_transformer_layer_offset``: chunk v of rank p starts at layer
    v x L/VPP + p x L/(PP x VPP), 0.16.1 ~169-176).

    Must be called on every rank after :func:`init_distributed` (it reads parallel_state).
    """
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    # MoE layers (models/moe.py): megatron's MoELayer with SequentialMLP experts, or TE's
    # grouped GEMM when moe_grouped_gemm is on; None builds the dense MLP.
    experts = {
        "num_experts": transformer_config.num_moe_experts,
        "moe_grouped_gemm": transformer_config.moe_grouped_gemm,
    }
    if use_transformer_engine(model):
        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_layernorm, **experts)
    else:
        spec = get_gpt_layer_local_spec(
            qk_layernorm=arch.qk_layernorm, normalization="RMSNorm", **experts
        )
        if transformer_config.context_parallel_size > 1:
            # megatron's local attention asserts CP == 1: all-gather K/V attention instead.
            from megatron_longact.models.cp_attention import with_cp_attention

            spec = with_cp_attention(spec)
        else:
            # megatron's local attention refuses packed THD rows: per segment, same kernel.
            from megatron_longact.models.cp_attention import with_packed_attention

            spec = with_packed_attention(spec)
        if transformer_config.sequence_parallel:
            # megatron's local norms assert SP is off; MoE x TP needs SP (models/sp_norm.py).
            from megatron_longact.models.sp_norm import sequence_parallel_block

            spec = sequence_parallel_block(spec, transformer_config)
    gpt = GPTModel(
        config=transformer_config,
        transformer_layer_spec=spec,
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
        **gpt_model_kwargs(arch, max_position_embeddings=model.max_position_embeddings),
    )
    if transformer_config.params_dtype != torch.float32:
        gpt = gpt.to(transformer_config.params_dtype)
    return gpt.to(current_device())


def unwrap_gpt(module: torch.nn.Module) -> torch.nn.Module:
    """The bare GPTModel under DDP / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module
