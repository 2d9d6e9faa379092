"""The planner's activation + logits figure against the memory a real train step allocates.

One tiny bf16 run on CPU (micro-qwen3: megatron's local spec, unfused attention, SwiGLU, the
distributed optimizer): a first train step creates Adam's states, the second runs under the
torch profiler with ``profile_memory``; its peak of live CPU allocations above the start is
what the step adds on top of the model state, i.e. what the planner calls activations +
logits. Two sequence lengths, so both the linear (per-token) and the quadratic (scores) terms
are exercised.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from megatron_longact.runtime.launch import run_local

CASES = ((256, 2), (512, 2))  # (seq_length, micro_batch_size)
TOLERANCE = 0.20
MOE_CASES = ((128, 8), (256, 4))
"""Short rows, many of them: the routed experts' activations outweigh attention's scores."""
STATE_TOLERANCE = 0.05  # grad buffers and optimizer shards carry megatron's bucket padding


def _peak_bytes(prof) -> int:
    """Peak of the running sum of the profiler's CPU allocation events (time order)."""
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        if event.device_type() == torch.autograd.DeviceType.CPU:
            live += event.nbytes()
            peak = max(peak, live)
    return peak


def _random_batch(seq: int, mbs: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """``mbs`` rows of ``seq`` random tokens, every token a loss token."""
    from megatron_longact.data.chat import TokenizedSample
    from megatron_longact.data.packing import collate, fill_bin

    rows = [torch.randint(1, 600, (seq,), generator=generator).tolist() for _ in range(mbs)]
    bins = [
        fill_bin(
            [TokenizedSample(input_ids=r, loss_mask=[1] * seq)], seq_length=seq, pad_token_id=0
        )
        for r in rows
    ]
    return collate(bins, with_attention_mask=True)


@dataclass(frozen=True)
class StateBytes:
    """What one rank's model state holds, counted on the live megatron objects."""

    params: int
    """Elements of this rank's model parameters (experts: only its EP share)."""
    grad_bytes: int
    """fp32 DDP grad buffers, dense and expert-parallel (padding included)."""
    optimizer_bytes: int
    """Distributed-optimizer shards: fp32 masters + Adam exp_avg and exp_avg_sq."""


def _state_bytes(state) -> StateBytes:
    ddp = state.model[0]
    buffers = [*ddp.buffers, *ddp.expert_parallel_buffers]
    optimizer = 0
    for inner in getattr(state.optimizer, "chained_optimizers", [state.optimizer]):
        for group in inner.shard_fp32_from_float16_groups:
            optimizer += sum(p.numel() * p.element_size() for p in group)
        for param_state in inner.optimizer.state.values():
            optimizer += sum(
                t.numel() * t.element_size()
                for k, t in param_state.items()
                if k in ("exp_avg", "exp_avg_sq")
            )
    return StateBytes(
        params=sum(p.numel() for p in ddp.parameters()),
        grad_bytes=sum(b.grad_data.numel() * b.grad_data.element_size() for b in buffers),
        optimizer_bytes=optimizer,
    )


def profiled_step_peaks(
    cases, model: tuple[str, ...] = ("model.preset=micro-qwen3",), *, with_state: bool = False
) -> list:
    """Per case: the profiled peak (bytes) of the second bf16 train step on random tokens
    (with ``with_state``: ``(peak, StateBytes)``); ``model``: the overrides naming the model
    and its layout."""
    from megatron_longact.config import JobConfig, load_config
    from megatron_longact.runtime.distributed import init_distributed
    from megatron_longact.runtime.forward import lm_forward_step
    from megatron_longact.runtime.setup import setup_train_state
    from megatron_longact.runtime.train_step import train_step

    peaks = []
    generator = torch.Generator().manual_seed(0)
    for seq, mbs in cases:
        job = load_config(JobConfig, None, [*model, "train.precision=bf16",
                                            f"data.seq_length={seq}"])  # fmt: skip
        state = setup_train_state(job, init_distributed(job.parallel, seed=0))

        kwargs = dict(forward_step_func=lm_forward_step, num_microbatches=1, seq_length=seq,
                      micro_batch_size=mbs)  # fmt: skip
        train_step(
            state, data_iterator=iter([_random_batch(seq, mbs, generator)]), **kwargs
        )  # Adam states exist now
        micro_batch = _random_batch(seq, mbs, generator)
        activities = [torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
            train_step(state, data_iterator=iter([micro_batch]), **kwargs)
        peak = _peak_bytes(prof)
        peaks.append((peak, _state_bytes(state)) if with_state else peak)
    return peaks


def test_planner_matches_profiled_train_step():
    from megatron_longact.plan.from_config import PACKAGE_MODELS_DIR
    from megatron_longact.plan.layout import Layout
    from megatron_longact.plan.memory import BYTES_PER_GIB, estimate_memory
    from megatron_longact.plan.model_spec import load_hf_config

    spec = load_hf_config(PACKAGE_MODELS_DIR / "micro-qwen3" / "config.json")
    peaks = run_local(profiled_step_peaks, 1, CASES)[0]
    for (seq, mbs), peak in zip(CASES, peaks):
        layout = Layout(num_nodes=1, gpus_per_node=1, sequence_parallel=False, seq_length=seq,
                        micro_batch_size=mbs, global_batch_size=mbs)  # fmt: skip
        estimate = estimate_memory(spec, layout, attention_backend="local", enforce_budget=False)
        planned = estimate.training_gib * BYTES_PER_GIB
        assert abs(planned - peak) <= TOLERANCE * peak, (seq, mbs, planned / 2**20, peak / 2**20)


def _expert_heavy_moe(folder) -> str:
    """micro-qwen3-moe with wider experts and top-4 routing, so that the dispatched tokens'
    activations (and the expert weights) dominate what the planner estimates."""
    from megatron_longact.models.hf_config import ASSETS_DIR

    config = json.loads((ASSETS_DIR / "micro-qwen3-moe" / "config.json").read_text())
    config.update(moe_intermediate_size=256, num_experts_per_tok=4)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def test_planner_matches_profiled_moe_step_at_expert_parallel_2(tmp_path):
    """The MoE terms (dispatched tokens x top-k through the experts, router logits; experts'
    weights, grads and Adam state split by EP) against a real bf16 step at EP=2 on 2 ranks."""
    from megatron_longact.plan.layout import Layout
    from megatron_longact.plan.memory import (
        BYTES_PER_GIB,
        GRAD_BYTES,
        estimate_memory,
        moe_activation_bytes_per_layer,
    )
    from megatron_longact.plan.model_spec import load_hf_config

    hf_dir = _expert_heavy_moe(tmp_path / "moe")
    spec = load_hf_config(hf_dir)
    model = (f"model.hf_path={hf_dir}", "parallel.expert_model_parallel_size=2")
    ranks = run_local(profiled_step_peaks, 2, MOE_CASES, model, with_state=True)
    for i, (seq, mbs) in enumerate(MOE_CASES):
        layout = Layout(num_nodes=1, gpus_per_node=2, sequence_parallel=False, seq_length=seq,
                        micro_batch_size=mbs, global_batch_size=2 * mbs,
                        expert_parallel_size=2)  # fmt: skip
        estimate = estimate_memory(spec, layout, attention_backend="local", enforce_budget=False)
        planned = estimate.training_gib * BYTES_PER_GIB
        moe_part = spec.num_layers * moe_activation_bytes_per_layer(
            spec, tokens_per_rank=seq, micro_batch_size=mbs
        )
        assert moe_part > 0.4 * planned  # the case exercises the MoE term
        for peak, state in (rank[i] for rank in ranks):
            assert abs(planned - peak) <= TOLERANCE * peak, (
                seq,
                mbs,
                planned / 2**20,
                peak / 2**20,
            )
            assert state.params == estimate.params_per_gpu
            grads = estimate.params_per_gpu * GRAD_BYTES
            assert abs(grads - state.grad_bytes) <= STATE_TOLERANCE * state.grad_bytes
            optimizer = estimate.optimizer_gib * BYTES_PER_GIB
            assert abs(optimizer - state.optimizer_bytes) <= STATE_TOLERANCE * state.optimizer_bytes
