"""The planner counts the colocated vLLM's memory share (rl.vllm_memory_fraction) and its
sleep mode for rl.engine=vllm recipes, and nothing of the kind for the native engine."""

from __future__ import annotations

from pathlib import Path

from megatron_longact.plan.from_config import load_plan_config, read_plan_inputs

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_vllm_recipe_reserves_its_memory_share():
    config = load_plan_config(EXAMPLES / "dapo_longact-qwen3_8b.yaml",
                              ["rl.vllm_memory_fraction=0.4"])  # fmt: skip
    inputs = read_plan_inputs(config)
    assert config.job.rl.engine == "vllm"
    assert inputs.rollout_memory_fraction == 0.4 and inputs.rollout_sleep is True
    assert inputs.generation_batch_size is None  # vLLM schedules its own batch
    native = read_plan_inputs(load_plan_config(EXAMPLES / "dapo_longact-qwen3_8b.yaml",
                                               ["rl.engine=native"]))  # fmt: skip
    assert native.rollout_memory_fraction is None and native.rollout_sleep is None
