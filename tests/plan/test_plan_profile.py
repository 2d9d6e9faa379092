"""The planner's activation + logits figure against the memory a real train step allocates.

One tiny bf16 run on CPU (micro-qwen3: megatron's local spec, unfused attention, SwiGLU, the
distributed optimizer): a first train step creates Adam's states, the second runs under the
torch profiler with ``profile_memory``; its peak of live CPU allocations above the start is
what the step adds on top of the model state, i.e. what the planner calls activations +
logits. Two sequence lengths, so both the linear (per-token) and the quadratic (scores) terms
are exercised.
"""

from __future__ import annotations

import torch

from megatron_longact.runtime.launch import run_local

CASES = ((256, 2), (512, 2))  # (seq_length, micro_batch_size)
TOLERANCE = 0.20


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


def profiled_step_peaks(cases) -> list[int]:
    """Per case: the profiled peak (bytes) of the second bf16 train step on random tokens."""
    from megatron_longact.config import JobConfig, load_config
    from megatron_longact.runtime.distributed import init_distributed
    from megatron_longact.runtime.forward import lm_forward_step
    from megatron_longact.runtime.setup import setup_train_state
    from megatron_longact.runtime.train_step import train_step

    peaks = []
    generator = torch.Generator().manual_seed(0)
    for seq, mbs in cases:
        job = load_config(JobConfig, None, ["model.preset=micro-qwen3", "train.precision=bf16",
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
        peaks.append(_peak_bytes(prof))
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
