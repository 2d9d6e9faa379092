"""Planner on MoE and 70B-class models: parameter counts as published, experts and their
optimizer state sharded by EP / expert-DP, and the layout rules of expert parallel."""

from __future__ import annotations

import pytest

from megatron_longact.plan.layout import Layout, LayoutError, check_layout
from megatron_longact.plan.memory import estimate_memory, layer_parameters_per_rank
from megatron_longact.plan.model_spec import (
    PRESETS,
    active_parameters,
    count_parameters,
    load_hf_config,
)


@pytest.mark.parametrize(
    ("name", "total", "active"),
    [("qwen3-30b-a3b", 30.5e9, 3.3e9), ("qwen3-235b-a22b", 235e9, 22e9),
     ("llama3.1-70b", 70.6e9, 70.6e9)],
)  # fmt: skip
def test_presets_match_published_sizes(name, total, active):
    spec = PRESETS[name]
    assert count_parameters(spec) == pytest.approx(total, rel=0.01)
    assert active_parameters(spec) == pytest.approx(active, rel=0.02)


def test_experts_split_over_expert_parallel():
    spec = PRESETS["qwen3-30b-a3b"]
    one = layer_parameters_per_rank(spec, tensor_parallel_size=1, expert_parallel_size=1)
    eight = layer_parameters_per_rank(spec, tensor_parallel_size=1, expert_parallel_size=8)
    experts = 128 * 3 * 2048 * 768
    assert one - eight == experts - experts // 8


def test_expert_optimizer_state_shards_over_expert_data_parallel():
    spec = PRESETS["qwen3-235b-a22b"]

    def optimizer_gib(ep: int) -> float:
        layout = Layout(num_nodes=8, gpus_per_node=8, tensor_parallel_size=8,
                        pipeline_parallel_size=2, context_parallel_size=4,
                        expert_parallel_size=ep, seq_length=32768, global_batch_size=8)  # fmt: skip
        estimate = estimate_memory(spec, layout, recompute="full", enforce_budget=False)
        return estimate.optimizer_gib

    # Experts' Adam state is spread over all ranks of a stage whatever EP: the same GiB.
    assert optimizer_gib(8) == pytest.approx(optimizer_gib(32), rel=0.02)
    assert optimizer_gib(8) > 40  # why 235B needs 16 nodes (README)


def test_expert_parallel_layout_rules():
    dense, moe = PRESETS["qwen3-32b"], PRESETS["qwen3-30b-a3b"]
    base = dict(num_nodes=1, gpus_per_node=8, seq_length=4096, global_batch_size=8)
    with pytest.raises(LayoutError, match="dense"):
        check_layout(dense, Layout(expert_parallel_size=2, **base))
    with pytest.raises(LayoutError, match="experts are not divisible"):
        check_layout(moe, Layout(expert_parallel_size=3, **base))
    check_layout(moe, Layout(expert_parallel_size=8, **base))


def test_hf_moe_config_reads_expert_fields():
    from megatron_longact.models.hf_config import ASSETS_DIR

    spec = load_hf_config(ASSETS_DIR / "micro-qwen3-moe")
    assert (spec.num_experts, spec.moe_router_topk, spec.moe_ffn_hidden_size) == (8, 2, 32)
