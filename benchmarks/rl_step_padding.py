"""RL policy step without padding: packed micro-batches vs padded rows, in one run.

One process builds the same model twice (same seed) and runs the RL step's training part on
both (``rl.step.step_micro_batches``: plan, layout, old log-probs; ``policy_updates``: DAPO
update), alternating which goes first so machine-load drift hits both alike, on scored samples
of a long-context length mix drawn from a fixed seed: prompts 30-100% of the prompt budget
(``--max-seq-length`` minus ``--max-new-tokens``), responses 10-100% of ``--max-new-tokens``.

    padded  rl.packing=false, data.micro_batch_size=``--rows`` (1): each sequence a row padded
            to the step's longest (the layout before packing)
    packed  rl.packing=true, rl.max_tokens_per_microbatch = ``--rows`` x the padded row length
            of the step (its longest sequence, rounded up): sequences packed into THD rows that
            never hold more tokens than a padded micro-batch (``--count-rows``: ``--rows``
            sequences per row, no budget). Attention runs per packed sequence: on CPU
            megatron's local kernel once per segment (``models.cp_attention.
            PackedDotProductAttention``), on GPU TE's THD attention

Prints, per variant, real (non-padding) tokens per second of wall time and of this process's
CPU time (single-threaded torch: the CPU-time figure is the one a busy shared machine does
not move; medians over the timed steps), the padding fraction (a property of the data and the
layout, not of load), the peak memory above the pre-step level (``longact_overhead.
peak_bytes``: torch's profiler on CPU, op-granular), and the ratios. Targets: real-token
throughput >= 1.5x padded, peak memory <= padded.

    python benchmarks/rl_step_padding.py                       # tiny-qwen3, CPU
    python benchmarks/rl_step_padding.py --max-seq-length 2048 --samples 32

Measured (tiny-qwen3, fp32, 1 thread, on a shared 2-core machine under load average 10-30:
flagged; ratios from one process each), ``--max-seq-length 512 --max-new-tokens 128 --samples
32 --steps 3 --warmup 1``: padding 30.8% padded vs 0.9% packed, 32 vs 28 micro-batches;
real-token throughput packed/padded 1.57x, 1.57x and 1.34x by CPU time (1.57x, 1.75x, 1.51x by
wall time) over three runs; peak memory 44.5 vs 45.0 MiB, 0.99x (the longest sequence alone
sets both peaks). The quickstart-like mix (``--max-seq-length 160 --max-new-tokens 48
--samples 64 --rows 8 --count-rows``: 8 sequences per micro-batch, packed or padded): padding
37.6% vs 0.5%, throughput 1.16x by CPU time (1.11x wall), peak 0.65x. Before packed rows went
to attention per sequence, a packed row took a dense [T, T] block-causal mask on CPU: 1.06x
the padded peak on the first mix, and the quickstart's RL step at 8 sequences per row took
12.6 s packed vs ~4 s padded.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
from dataclasses import replace

import torch
from longact_overhead import peak_bytes  # benchmarks/ is the script's folder

from megatron_longact.config import JobConfig, load_config

VARIANTS = ("padded", "packed")


def length_mix(num: int, *, max_seq_length: int, max_new_tokens: int, seed: int):
    """(prompt, response) lengths: prompts 30-100% of the prompt budget, responses 10-100%
    of the generation budget, uniform, from ``seed``."""
    rng = random.Random(seed)
    budget = max_seq_length - max_new_tokens
    return [(rng.randint(int(0.3 * budget), budget),
             rng.randint(max(1, int(0.1 * max_new_tokens)), max_new_tokens))
            for _ in range(num)]  # fmt: skip


def make_samples(lengths, *, vocab: int, seed: int) -> list:
    from megatron_longact.rl.experience import Sample

    gen = torch.Generator().manual_seed(seed)
    out = []
    for prompt, response in lengths:
        ids = torch.randint(3, vocab, (prompt + response,), generator=gen).tolist()
        out.append(Sample(prompt_ids=ids[:prompt], response_ids=ids[prompt:],
                          engine_logprobs=[0.0] * response, reward=0.0, format_ok=True,
                          answer_ok=False, truncated=False,
                          advantage=float(torch.randn(1, generator=gen))))  # fmt: skip
    return out


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-qwen3")
    parser.add_argument("--hf-path", default=None, help="a local HF config folder instead")
    parser.add_argument("--max-seq-length", type=int, default=1024)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--samples", type=int, default=16, help="sequences per RL step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk", type=int, default=4096, help="rl.logprob_chunk_tokens")
    parser.add_argument("--rows", type=int, default=1,
                        help="padded rows per micro-batch; the packed budget is as many padded "
                        "rows' tokens (the same tokens per micro-batch)")  # fmt: skip
    parser.add_argument("--count-rows", action="store_true",
                        help="packed rows hold --rows sequences each (data.micro_batch_size, no "
                        "token budget), as a recipe without rl.max_tokens_per_microbatch")  # fmt: skip
    return parser.parse_args()


def main() -> None:
    args = _parse_args()
    from megatron_longact.rl.batch import padded_length, padding_fraction
    from megatron_longact.rl.step import policy_updates, step_micro_batches
    from megatron_longact.runtime.distributed import init_distributed, shutdown
    from megatron_longact.runtime.setup import setup_train_state

    model = f"model.hf_path={args.hf_path}" if args.hf_path else f"model.preset={args.preset}"
    common = [model, "model.attention_backend=local",
              "optim.warmup_steps=0", f"rl.max_seq_length={args.max_seq_length}",
              f"rl.max_new_tokens={args.max_new_tokens}", "longact.strategy=none",
              f"data.micro_batch_size={args.rows}", f"rl.logprob_chunk_tokens={args.chunk}",
              f"train.train_steps={args.warmup + args.steps + 2}"]  # fmt: skip
    jobs = {
        "padded": load_config(JobConfig, None, [*common, "rl.packing=false"]),
        "packed": load_config(JobConfig, None, [*common, "rl.packing=true"]),
    }
    dims = init_distributed(jobs["padded"].parallel, seed=0)
    states = {name: setup_train_state(job, dims) for name, job in jobs.items()}
    vocab = states["padded"].arch.vocab_size

    def step_fn(name: str, step: int, out: dict):
        lengths = length_mix(args.samples, max_seq_length=args.max_seq_length,
                             max_new_tokens=args.max_new_tokens, seed=args.seed + step)  # fmt: skip
        samples = make_samples(lengths, vocab=vocab, seed=args.seed + step)
        out["real"] = sum(p + r for p, r in lengths)

        def run():
            job, state = jobs[name], states[name]
            if job.rl.packing and not args.count_rows:  # at most a padded micro-batch's tokens
                budget = args.rows * padded_length(samples)
                job = replace(job, rl=replace(job.rl, max_tokens_per_microbatch=budget))
            updates, _ = step_micro_batches(job, state, samples, pad_token_id=0)
            out["padding"] = padding_fraction([b for u in updates for b in u])
            out["micro"] = sum(len(u) for u in updates)
            policy_updates(job, state, updates, step=step + 1)

        return run

    times = {name: [] for name in VARIANTS}
    cpu_times = {name: [] for name in VARIANTS}
    info = {name: {} for name in VARIANTS}
    for step in range(args.warmup + args.steps):
        for name in VARIANTS if step % 2 == 0 else tuple(reversed(VARIANTS)):
            run = step_fn(name, step, info[name])
            gc.collect()
            start, cpu_start = time.perf_counter(), time.process_time()
            run()
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            if step >= args.warmup:
                times[name].append(info[name]["real"] / elapsed)
                cpu_times[name].append(info[name]["real"] / cpu)
    # The profiled step runs once unprofiled first, on the same data: megatron's one-off
    # caches (RoPE tables per max sequence length, an lru_cache of 32, rotary_pos_embedding.py
    # ~177; the attention's "mpu" score buffer) are then in place, and the profiler, which
    # cannot see the frees of blocks allocated before it (their LRU evictions), counts only
    # the step's own memory.
    peaks = {}
    for name in VARIANTS:
        step_fn(name, args.warmup + args.steps, info[name])()
        gc.collect()
        peaks[name] = peak_bytes(step_fn(name, args.warmup + args.steps, info[name]))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"model {args.hf_path or args.preset}, {args.samples} sequences per step, "
          f"{args.rows} padded row(s) per micro-batch, "
          f"rl.max_seq_length {args.max_seq_length}, rl.max_new_tokens {args.max_new_tokens}, seed {args.seed}, "
          f"{device}")  # fmt: skip
    for name in VARIANTS:
        print(f"{name:7s} real tokens/s: wall {statistics.median(times[name]):8.1f}, CPU "
              f"{statistics.median(cpu_times[name]):8.1f}  padding {info[name]['padding']:6.1%}"
              f"  micro-batches {info[name]['micro']:3d}  peak {peaks[name] / 2**20:7.1f} MiB")  # fmt: skip
    wall = statistics.median(times["packed"]) / statistics.median(times["padded"])
    cpu = statistics.median(cpu_times["packed"]) / statistics.median(cpu_times["padded"])
    peak = peaks["packed"] / max(peaks["padded"], 1)
    print(f"ratio packed/padded: real-token throughput {cpu:.2f}x by CPU time, {wall:.2f}x by "
          f"wall time (target >= 1.5); peak memory {peak:.2f}x (target <= 1)")  # fmt: skip
    shutdown()


if __name__ == "__main__":
    main()
