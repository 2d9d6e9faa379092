"""DAPO + LongAct on the tiny Qwen3-MoE at EP=2 with the native engine: generation runs the
MoE layers' all-to-all in lockstep over ranks holding different prompts; LongAct's masks touch
only attention's fused QKV rows (experts and router train densely); the aux loss is logged."""

from __future__ import annotations

import json

import pytest

from megatron_longact.runtime.launch import run_local


def _rl(overrides: list[str]):
    from megatron_longact.config import JobConfig, load_config
    from megatron_longact.rl.loop import run_rl

    return run_rl(load_config(JobConfig, None, overrides))


@pytest.mark.slow
def test_dapo_longact_native_engine_at_expert_parallel_2(tiny_moe, synthetic_data_dir, tmp_path):
    run_local(_rl, 2, [
        f"model.hf_path={tiny_moe.hf_dir}", "parallel.expert_model_parallel_size=2",
        f"data.train_path={synthetic_data_dir / 'rl_train.jsonl'}", "train.precision=fp32",
        f"logging.tensorboard_dir={tmp_path / 'tb'}", "logging.progress=false",
        "optim.lr=1e-3", "optim.warmup_steps=0", "train.train_steps=2",
        "data.micro_batch_size=4", "rl.engine=native",
        "rl.prompts_per_step=2", "rl.rollouts_per_prompt=4", "rl.max_new_tokens=12",
        "rl.max_seq_length=256", "rl.dynamic_sampling=false",
        "longact.strategy=massive", "longact.ratio=0.3",
    ])  # fmt: skip
    lines = (tmp_path / "tb" / "metrics.jsonl").read_text().splitlines()
    metrics = [m for m in map(json.loads, lines) if "train/loss" in m]
    assert [m["step"] for m in metrics] == [1, 2]
    last = metrics[-1]
    assert last["train/moe/load_balancing_loss"] > 0
    # One trainable fraction per masked weight: the 2 layers' linear_qkv, about lambda each.
    fractions = {k: v for k, v in last.items() if "trainable" in k}
    assert fractions and all(0.2 < f < 0.4 for f in fractions.values()), fractions


@pytest.mark.slow
def test_a_rank_without_prompts_still_decodes_in_lockstep(tiny_moe, synthetic_data_dir, tmp_path):
    """One prompt for two DP replicas at EP=2: rank 1 generates nothing, yet its experts must
    answer rank 0's all-to-alls for every decode step (rl/experience.py calls the engine with an
    empty list; the native engine runs placeholder batches in lockstep). It hung before."""
    run_local(_rl, 2, [
        f"model.hf_path={tiny_moe.hf_dir}", "parallel.expert_model_parallel_size=2",
        f"data.train_path={synthetic_data_dir / 'rl_train.jsonl'}", "train.precision=fp32",
        f"logging.tensorboard_dir={tmp_path / 'tb'}", "logging.progress=false",
        "optim.lr=1e-3", "optim.warmup_steps=0", "train.train_steps=1",
        "data.micro_batch_size=4", "rl.engine=native",
        "rl.prompts_per_step=1", "rl.rollouts_per_prompt=4", "rl.max_new_tokens=8",
        "rl.max_seq_length=256", "rl.dynamic_sampling=false",
    ])  # fmt: skip
    (metrics,) = [json.loads(x) for x in (tmp_path / "tb" / "metrics.jsonl").read_text().splitlines()
                  if "train/loss" in x]  # fmt: skip
    assert metrics["rollout/engine_responses"] == metrics["rollout/generated"] == 4


def _native_greedy(hf_dir: str, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    from megatron_longact.config import JobConfig, load_config
    from megatron_longact.rl.rollout.native import NativeEngine
    from megatron_longact.rl.rollout.types import SamplingParams
    from megatron_longact.runtime.distributed import init_distributed
    from megatron_longact.runtime.setup import load_start_weights, setup_train_state

    job = load_config(JobConfig, None, [f"model.hf_path={hf_dir}", "train.precision=fp32"])
    state = setup_train_state(job, init_distributed(job.parallel, seed=0))
    load_start_weights(job, state)
    engine = NativeEngine(state.model[0], pad_token_id=0, batch_size=len(prompts))
    greedy = SamplingParams(temperature=0.0, max_new_tokens=new_tokens)
    return [r.response_ids for r in engine.generate(prompts, greedy)]


def test_native_engine_decodes_moe_as_transformers(tiny_moe):
    """Native decode at EP=1 (KV cache, the CPU bridge kept on for the router, which moves its
    weight to the current device each forward) gives transformers' greedy tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    new_tokens = 8
    prompts = tiny_moe.tokens.tolist()
    (native,) = run_local(_native_greedy, 1, str(tiny_moe.hf_dir), prompts, new_tokens)
    hf = AutoModelForCausalLM.from_pretrained(tiny_moe.hf_dir, dtype=torch.float32)
    with torch.no_grad():
        out = hf.generate(tiny_moe.tokens, max_new_tokens=new_tokens, do_sample=False,
                          min_new_tokens=new_tokens, pad_token_id=0)  # fmt: skip
    assert native == out[:, tiny_moe.tokens.shape[1] :].tolist()
