"""LongAct overhead on one process: step time and peak memory, LongAct vs the dense run.

Builds the same model twice (dense, and LongAct with the paper's defaults: massive, lambda 0.3,
q+k, dynamic masks) and alternates their training steps on the same batches, swapping which
goes first, so machine-load drift hits both alike. Prints the step-time ratio (median of the
per-step ratios), the peak-memory ratio, and the time of LongAct's per-step work (M reduce +
selection + masking) and of the selection alone. Targets: <= 1.02 and <= 1.01.

Peak memory is the peak of live tensor bytes above the level before the step: CUDA's
``max_memory_allocated`` on GPU; on CPU the running sum of the allocations and frees that torch's
profiler records (the process resident set is too coarse: glibc and thread timing move it by
whole attention-score buffers from step to step, dense or not).

    python benchmarks/longact_overhead.py                      # tiny-qwen3, CPU
    python benchmarks/longact_overhead.py --seq 2048 --steps 12 --packed
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from megatron_longact.config import JobConfig, load_config

MEMORY_STEPS = 2
SELECTION_REPEATS = 20


def _profiled_peak(fn) -> int:
    """Peak CPU tensor bytes above the level before ``fn()``: torch's profiler records every
    allocation and free of the CPU allocator; their running sum in time order is the live
    tensor memory (at op granularity)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def peak_bytes(fn) -> int:
    """Peak tensor bytes allocated above the level before ``fn()`` (CUDA or CPU)."""
    if not torch.cuda.is_available():
        return _profiled_peak(fn)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _batches(step: int, *, vocab: int, num: int, mbs: int, seq: int, packed: bool) -> list[dict]:
    gen = torch.Generator().manual_seed(step)
    out = []
    for _ in range(num):
        tokens = torch.randint(0, vocab, (mbs, seq), generator=gen)
        token_mask = torch.ones(mbs, seq)
        token_mask[:, seq - seq // 8 :] = 0  # some padding
        batch = {
            "tokens": tokens,
            "labels": tokens.roll(-1, 1),
            "loss_mask": token_mask.clone(),
            "position_ids": torch.arange(seq).expand(mbs, seq),
            "token_mask": token_mask,
        }
        if packed:  # 4 segments per row; only LongAct reads cu_seqlens here (bshd attention)
            batch["cu_seqlens"] = torch.arange(0, mbs * seq + 1, seq // 4, dtype=torch.int32)
        out.append(batch)
    return out


def _forward_step(data_iterator, model):
    from megatron_longact.runtime.forward import lm_forward_step

    batch = next(data_iterator)
    return lm_forward_step(iter([{k: v for k, v in batch.items() if k != "cu_seqlens"}]), model)


def _time_hooks(controller) -> list[float]:
    """Wraps the meter's accumulator so the hooks' own time is summed into the returned list
    (a load-independent view of the overhead; the paired step times are noisy on a shared
    machine)."""
    total = [0.0]
    meter = controller._meter
    if meter is None:
        return total
    accumulator = meter.accumulator
    for name in ("add", "begin_micro_batch"):
        original = getattr(accumulator, name)

        def timed(*args, _original=original):
            start = time.perf_counter()
            _original(*args)
            total[0] += time.perf_counter() - start

        setattr(accumulator, name, timed)
    return total


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-qwen3")
    parser.add_argument("--hf-path", default=None, help="a local HF config folder instead")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--mbs", type=int, default=1)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--packed", action="store_true", help="per-segment sums (cu_seqlens)")
    parser.add_argument("--mode", default="grad", choices=["grad", "freeze"])
    parser.add_argument(
        "--strategy",
        default="massive",
        choices=["massive", "min", "random", "none"],
        help="none: an A/A run, to see the timing noise",
    )
    return parser.parse_args()


def main() -> None:
    args = _parse_args()
    from megatron_longact.longact import LongActController
    from megatron_longact.runtime.distributed import init_distributed, shutdown
    from megatron_longact.runtime.setup import setup_train_state
    from megatron_longact.runtime.train_step import train_step

    total_steps = args.warmup + args.steps + MEMORY_STEPS
    overrides = [
        f"model.preset={args.preset}",
        f"data.seq_length={args.seq}",
        "optim.warmup_steps=0",
        f"longact.mode={args.mode}",
        f"longact.strategy={args.strategy}",
        f"train.train_steps={total_steps}",
    ]
    if args.hf_path:
        overrides.append(f"model.hf_path={args.hf_path}")
    job = load_config(JobConfig, None, overrides)
    dims = init_distributed(job.parallel, seed=job.train.seed)
    dense = setup_train_state(job, dims)
    longact = setup_train_state(job, dims)
    controller = LongActController.from_train_state(job.longact, longact)
    runs = {"dense": (dense, None), "longact": (longact, controller)}
    hook_seconds = _time_hooks(controller)

    def step_fn(name: str, step: int):
        state, ctl = runs[name]
        batches = _batches(step, vocab=dense.arch.vocab_size, num=args.micro_batches,
                           mbs=args.mbs, seq=args.seq, packed=args.packed)  # fmt: skip
        iterator = iter(batches) if ctl is None else ctl.observe(iter(batches))
        return lambda: train_step(
            state,
            forward_step_func=_forward_step,
            data_iterator=iterator,
            num_microbatches=args.micro_batches,
            seq_length=args.seq,
            micro_batch_size=args.mbs,
        )

    # Timing: alternate the runs (and which goes first); GC paused inside a step so that
    # collections of megatron's reference cycles land between steps for both.
    times: dict[str, list[float]] = {name: [] for name in runs}
    for step in range(args.warmup + args.steps):
        for name in list(runs) if step % 2 == 0 else list(reversed(runs)):
            run = step_fn(name, step)
            gc.collect()
            gc.disable()
            start = time.perf_counter()
            run()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            gc.enable()
            if step >= args.warmup:
                times[name].append(elapsed)
    hooks_ms = 1000 * hook_seconds[0] / (args.warmup + args.steps)
    peaks = {name: 0 for name in runs}
    for step in range(args.warmup + args.steps, total_steps):
        for name in runs:
            gc.collect()
            peaks[name] = max(peaks[name], peak_bytes(step_fn(name, step)))

    select_ms = []
    for _ in range(SELECTION_REPEATS):
        start = time.perf_counter()
        controller._select_from(controller.saliency, step=0)
        select_ms.append(1000 * (time.perf_counter() - start))
    ratios = [b / a for a, b in zip(times["dense"], times["longact"])]
    dense_t, longact_t = statistics.median(times["dense"]), statistics.median(times["longact"])
    arch = dense.arch
    print(
        f"model {args.hf_path or args.preset}: hidden {arch.hidden_size}, {arch.num_layers} "
        f"layers, {arch.num_attention_heads} q heads x {arch.head_dim}, "
        f"{arch.num_query_groups} kv groups; {args.micro_batches} micro-batches of "
        f"{args.mbs}x{args.seq} tokens{' packed' if args.packed else ''}; "
        f"{args.strategy}/{args.mode}; {'cuda' if torch.cuda.is_available() else 'cpu'}"
    )
    print(
        f"step time    dense {1000 * dense_t:8.1f} ms  longact {1000 * longact_t:8.1f} ms  "
        f"ratio {statistics.median(ratios):.3f} (median of {len(ratios)} paired steps, "
        f"{min(ratios):.3f}-{max(ratios):.3f}; fastest steps "
        f"{min(times['longact']) / min(times['dense']):.3f}; target <= 1.02)"
    )
    print(
        f"peak memory  dense {peaks['dense'] / 2**20:8.1f} MiB longact "
        f"{peaks['longact'] / 2**20:8.1f} MiB ratio {peaks['longact'] / max(peaks['dense'], 1):.3f}"
        " (tensor bytes above the pre-step level; target <= 1.01)"
    )
    finalize_ms = controller.metrics().get("longact/select_ms", 0.0)
    print(
        f"longact work per step: hooks {hooks_ms:.2f} ms + reduce M/select/mask "
        f"{finalize_ms:.2f} ms = {(hooks_ms + finalize_ms) / (10 * dense_t):.2f}% of the dense "
        f"step; selection alone {statistics.median(select_ms):.2f} ms"
    )
    controller.close()
    shutdown()


if __name__ == "__main__":
    main()
