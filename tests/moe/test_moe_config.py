"""Qwen3-MoE configs: what maps to megatron's MoE layers, and one-line errors for what does not."""

from __future__ import annotations

import json

import pytest

from megatron_longact.config.schema import ModelConfig, ParallelConfig
from megatron_longact.models.hf_config import ASSETS_DIR, parse_hf_config
from megatron_longact.models.moe import check_expert_layout, moe_transformer_config_kwargs

MOE = json.loads((ASSETS_DIR / "micro-qwen3-moe" / "config.json").read_text())


def test_router_semantics_map_to_megatron():
    arch = parse_hf_config(MOE)
    kwargs = moe_transformer_config_kwargs(
        arch, model=ModelConfig(), parallel=ParallelConfig(), use_te=False
    )
    # norm_topk_prob=true: top-k of the logits then softmax over them (moe_utils.py ~713-715).
    assert kwargs["moe_router_pre_softmax"] is False
    unnormalised = parse_hf_config({**MOE, "norm_topk_prob": False})
    assert moe_transformer_config_kwargs(
        unnormalised, model=ModelConfig(), parallel=ParallelConfig(), use_te=False
    )["moe_router_pre_softmax"]
    assert kwargs["moe_aux_loss_coeff"] == 0.001  # the HF router_aux_loss_coef
    assert kwargs["moe_grouped_gemm"] is False and kwargs["moe_router_dtype"] == "fp32"
    override = ModelConfig(moe_aux_loss_coeff=0.01)
    sp = ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True,
                        expert_tensor_parallel_size=1)  # fmt: skip
    # Per-rank token scaling of megatron's aux loss under SP, compensated (models/moe.py).
    assert moe_transformer_config_kwargs(arch, model=override, parallel=sp, use_te=False)[
        "moe_aux_loss_coeff"
    ] == pytest.approx(0.02)
    off = ModelConfig(moe_load_balancing="none")
    kwargs = moe_transformer_config_kwargs(arch, model=off, parallel=ParallelConfig(), use_te=False)
    assert kwargs["moe_router_load_balancing_type"] == "none"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mlp_only_layers": [0]}, "mlp_only_layers"),
        ({"decoder_sparse_step": 2}, "decoder_sparse_step"),
        ({"num_experts_per_tok": 9}, "exceeds"),
        ({"num_experts": None}, "num_experts"),
    ],
)
def test_unmappable_moe_configs_are_one_line_errors(change, message):
    with pytest.raises(ValueError, match=message):
        parse_hf_config({**MOE, **change}, source="cfg.json")


def test_dense_models_refuse_moe_fields_and_expert_parallel():
    dense = json.loads((ASSETS_DIR / "micro-qwen3" / "config.json").read_text())
    with pytest.raises(ValueError, match="mixture-of-experts fields"):
        parse_hf_config({**dense, "num_experts": 8})
    with pytest.raises(ValueError, match="dense"):
        check_expert_layout(parse_hf_config(dense), ParallelConfig(expert_model_parallel_size=2))


def test_expert_layout_errors_name_the_field():
    arch = parse_hf_config(MOE)
    with pytest.raises(ValueError, match="expert_model_parallel_size=3"):
        check_expert_layout(arch, ParallelConfig(expert_model_parallel_size=3))
    # gloo cannot all-gather uneven token counts: expert-TP > 1 is GPU only.
    with pytest.raises(ValueError, match="expert_tensor_parallel_size=1"):
        check_expert_layout(arch, ParallelConfig(tensor_model_parallel_size=2))


def test_checkpoint_sees_chained_optimizer_state():
    # An MoE model's optimizer is megatron's ChainedOptimizer (dense + expert), whose members'
    # keys carry a chained_<i>. prefix; a resume must recognise them as optimizer state.
    from megatron_longact.checkpoint.dist_ckpt import OPTIMIZER_KEY

    for key in (
        "optimizer.distributed.dp_group_idx_0.param_groups",
        "chained_1.optimizer.distributed.dp_group_idx_1.gbuf_idx_0.bucket_idx_0.exp_avg",
    ):
        assert OPTIMIZER_KEY.match(key)
    assert not OPTIMIZER_KEY.match("module.decoder.layers.0.mlp.experts.experts.linear_fc1")
