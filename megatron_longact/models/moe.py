"""Mixture-of-experts (Qwen3-MoE) as megatron-core MoE layers: config, layer spec, aux-loss log.

Router semantics, HF -> megatron-core 0.16.1:

* transformers' ``Qwen3MoeTopKRouter.forward`` (``models/qwen3_moe/modeling_qwen3_moe.py``
  ~258-266): ``logits = x @ W_gate^T``; ``softmax`` over all experts in fp32; ``topk``; when
  ``norm_topk_prob`` the k probabilities are divided by their sum. The expert outputs are
  weighted by them and summed (``Qwen3MoeExperts.forward`` ~221-245).
* megatron's ``topk_routing_with_score_function`` (``transformer/moe/moe_utils.py`` ~709-715),
  score function softmax: ``moe_router_pre_softmax=True`` is softmax over all experts then
  top-k (the k probabilities are not renormalised) = HF ``norm_topk_prob=false``;
  ``moe_router_pre_softmax=False`` is top-k of the logits then softmax over those k, which is
  the renormalised top-k of the full softmax = HF ``norm_topk_prob=true`` (softmax is monotone,
  so both pick the same experts). The gating linear runs in ``moe_router_dtype`` (fp32 here,
  ``router.py`` ~95-100; megatron warns without it from 32 experts on,
  ``transformer_config.py`` ~1945).
* No shared experts, no expert bias, dropless (no capacity factor): every routed token reaches
  its expert, as in HF.

Load balancing: megatron adds the Switch aux loss per layer inside backward
(``MoEAuxLossAutoScaler``, ``router.py`` ~275-313, scaled by the micro-batch's token count
under ``calculate_per_token_loss``, ~456-466) and records the unscaled loss per layer in its
tracker (``moe_utils.py`` ~866-901); :func:`moe_step_metrics` reads and clears that tracker
once per optimizer step.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_longact.config.schema import ModelConfig, ParallelConfig
from megatron_longact.device import on_cuda
from megatron_longact.errors import UserError
from megatron_longact.models.hf_config import HFArchitecture

LOAD_BALANCING_METRIC = "moe/load_balancing_loss"
"""Step metric: unscaled aux loss, mean over layers, micro-batches and ranks."""
_TRACKER_NAMES = {
    "load_balancing_loss": LOAD_BALANCING_METRIC,
    "seq_load_balancing_loss": "moe/seq_load_balancing_loss",
    "global_load_balancing_loss": "moe/global_load_balancing_loss",
}


def aux_loss_coeff(arch: HFArchitecture, model: ModelConfig) -> float:
    """The run's load-balancing coefficient: ``model.moe_aux_loss_coeff`` or the HF value."""
    if model.moe_load_balancing == "none":
        return 0.0
    if model.moe_aux_loss_coeff is not None:
        return model.moe_aux_loss_coeff
    return arch.router_aux_loss_coef


def use_grouped_gemm(model: ModelConfig, *, use_te: bool) -> bool:
    """Grouped GEMM experts need Transformer Engine (``TEGroupedMLP``); local spec otherwise."""
    if model.moe_grouped_gemm == "on" and not use_te:
        raise UserError(
            "model.moe_grouped_gemm=on needs CUDA and transformer-engine; use auto or off"
        )
    return use_te and model.moe_grouped_gemm != "off"


def check_expert_layout(arch: HFArchitecture, parallel: ParallelConfig) -> None:
    """Raises UserError naming the field when the expert layout does not fit the model."""
    ep = parallel.expert_model_parallel_size
    if not arch.is_moe:
        if ep > 1 or (parallel.expert_tensor_parallel_size or 1) > 1:
            raise UserError(
                "parallel.expert_model_parallel_size / expert_tensor_parallel_size apply to "
                f"mixture-of-experts models only; {arch.model_type} is dense: set them to 1"
            )
        return
    if arch.num_experts % ep:
        raise UserError(
            f"parallel.expert_model_parallel_size={ep} does not divide num_experts="
            f"{arch.num_experts}; pick a divisor"
        )
    etp = parallel.expert_tensor_parallel_size or parallel.tensor_model_parallel_size
    if etp > 1 and not on_cuda():
        # The dispatcher all-gathers a different token count from each expert-TP rank
        # (token_dispatcher.py ~696, mappings.py ~143-150); gloo's all_gather needs equal sizes.
        raise UserError(
            f"expert tensor parallel size {etp} (parallel.expert_tensor_parallel_size, default "
            "tensor_model_parallel_size) needs GPUs: gloo cannot all-gather uneven token "
            "counts; on CPU set parallel.expert_tensor_parallel_size=1"
        )
    if arch.moe_ffn_hidden_size % etp:
        raise UserError(
            f"expert tensor parallel size {etp} (parallel.expert_tensor_parallel_size, default "
            f"tensor_model_parallel_size) does not divide moe_intermediate_size="
            f"{arch.moe_ffn_hidden_size}"
        )


def moe_transformer_config_kwargs(
    arch: HFArchitecture, *, model: ModelConfig, parallel: ParallelConfig, use_te: bool
) -> dict[str, Any]:
    """``TransformerConfig`` MoE fields for ``arch`` (empty for a dense model)."""
    check_expert_layout(arch, parallel)
    if not arch.is_moe:
        return {}
    coeff = aux_loss_coeff(arch, model)
    # Under calculate_per_token_loss megatron attaches each rank's aux loss scaled by its own
    # token count (router.py ~456-466). With sequence or context parallel a TP x CP rank holds
    # 1/(TP x CP) of the tokens, and the ranks' losses sum to the whole sequence's, so the
    # aux-loss gradient comes out 1/(TP x CP) of the same run at TP = CP = 1 (measured on CPU:
    # EP=2 x TP=2 with SP drifts from EP=1 only with the aux loss on). Scaling the coefficient
    # back makes every layout train the same model; the logged loss divides it out again.
    token_split = parallel.context_parallel_size * (
        parallel.tensor_model_parallel_size if parallel.sequence_parallel else 1
    )
    return {
        "num_moe_experts": arch.num_experts,
        "moe_ffn_hidden_size": arch.moe_ffn_hidden_size,
        "moe_router_topk": arch.moe_router_topk,
        "moe_router_score_function": "softmax",
        "moe_router_pre_softmax": not arch.moe_norm_topk_prob,
        "moe_router_dtype": "fp32",
        "moe_router_load_balancing_type": model.moe_load_balancing if coeff > 0 else "none",
        "moe_aux_loss_coeff": coeff * token_split,
        "moe_token_dispatcher_type": model.moe_token_dispatcher,
        "moe_grouped_gemm": use_grouped_gemm(model, use_te=use_te),
        "moe_permute_fusion": False,
        "expert_model_parallel_size": parallel.expert_model_parallel_size,
        "expert_tensor_parallel_size": parallel.expert_tensor_parallel_size,
    }


def moe_step_metrics(transformer_config, *, num_microbatches: int) -> dict[str, float]:
    """Reads and clears megatron's aux-loss tracker after a step's forward/backward.

    Returns ``{"moe/load_balancing_loss": value, ...}`` for each tracked loss (empty for a
    dense model or when no aux loss is on): the unscaled loss (coefficient divided out) summed
    over layers (and the TP x CP ranks' tokens), divided by the number of MoE layers and
    micro-batches, averaged over data-parallel replicas. The same on every rank. All ranks must call it (collective over the world; gloo has
    no AVG, so a SUM and a division, unlike megatron's ``reduce_aux_losses_tracker_across_ranks``
    which averages over DP, ``moe_utils.py`` ~910-952).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
    )

    if getattr(transformer_config, "num_moe_experts", None) is None:
        return {}
    tracker = get_moe_layer_wise_logging_tracker()
    names = sorted(n for n in tracker if n in _TRACKER_NAMES)
    if not names:
        return {}
    totals = torch.stack([tracker[n]["values"].float().sum() for n in names]).double()
    # Each layer lives on one pipeline stage, and under sequence/context parallel each TP x CP
    # rank holds the loss of its own tokens (megatron sums those, moe_utils.py ~940): sum over
    # the world, then average the data-parallel replicas.
    dist.all_reduce(totals)
    replicas = parallel_state.get_data_parallel_world_size()
    totals /= replicas * transformer_config.num_layers * max(num_microbatches, 1)
    clear_aux_losses_tracker()
    return {_TRACKER_NAMES[n]: float(v) for n, v in zip(names, totals.tolist())}
