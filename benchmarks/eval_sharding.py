"""``longact eval`` on one process vs N data-parallel processes, in one run.

Both run the CLI as a user does (process start-up, checkpoint load, greedy pass, sampled pass,
tables), on the same checkpoint and held-out prompts, alternating which goes first so that
machine-load drift hits both alike:

    1 process   ``python -m megatron_longact.cli eval``: torch's default threads (all cores)
    N processes ``python -m megatron_longact.runtime.launch --standalone --nproc-per-node N
                -m megatron_longact.cli eval`` (torchrun's one thread per process): each
                replica decodes its share of every call's engine batches
                (``eval.backends.sharded_generate``)

Prints the wall time of each and the ratio, and whether the greedy and sampled predictions
are identical. They are identical when both sides compute with the same kernels; one thread
vs two can change a matmul's summation order on CPU, so a sampled token may differ there
(``tests/eval/test_eval_sharded.py`` holds exact equality at one thread per process).

    bash examples/quickstart_cpu.sh          # or any megatron checkpoint and rl_val.jsonl
    python benchmarks/eval_sharding.py --checkpoint runs/quickstart/sft/checkpoints \\
        --data runs/quickstart/data/rl_val.jsonl

Measured (2026-12-07, the 2-core machine, otherwise idle but for the command; the quickstart's
SFT checkpoint, ``--repeats 2``: 200 prompts x (1 greedy + 8 sampled), 64 new tokens,
tiny-qwen3): 1 process 72.1 s (median), 2 processes 54.4 s, speed-up 1.33x; identical
predictions, greedy and sampled (the two threads of the one process did not change a token).
Start-up (~15 s a run: imports, gloo, checkpoint load) is in both and not sped up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from megatron_longact.eval.runner import predictions_path


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="runs/quickstart/sft/checkpoints")
    parser.add_argument("--data", default="runs/quickstart/data/rl_val.jsonl",
                        help="held-out RL prompts (longact data's rl_val.jsonl)")  # fmt: skip
    parser.add_argument("--preset", default="tiny-qwen3")
    parser.add_argument("--procs", type=int, default=2, help="DP processes of the sharded run")
    parser.add_argument("--prompts", type=int, default=200, help="first N prompts of --data")
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    return parser.parse_args()


def _run(prefix: list[str], overrides: list[str], out: Path) -> float:
    start = time.perf_counter()
    subprocess.run([*prefix, "eval", *overrides, f"eval.out_dir={out}"], check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    return time.perf_counter() - start


def _responses(out: Path) -> tuple[list, list]:
    def read(name: str) -> list:
        return [json.loads(line) for line in predictions_path(out, name).read_text().splitlines()]

    greedy = [r["response"] for r in read("synthetic_kv")]
    sampled = [[s["response"] for s in r["samples"]] for r in read("synthetic_kv.T1")]
    return greedy, sampled


def main() -> None:
    args = _parse_args()
    for path in (args.checkpoint, args.data):
        if not Path(path).exists():
            sys.exit(f"{path}: not found; run examples/quickstart_cpu.sh or pass --checkpoint "
                     "and --data")  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="eval_sharding_"))
    data = work / "prompts.jsonl"
    lines = Path(args.data).read_text().splitlines(keepends=True)[: args.prompts]
    data.write_text("".join(lines))
    overrides = [f"model.preset={args.preset}", f"checkpoint.load_dir={args.checkpoint}",
                 "eval.suites=[synthetic_kv]", f"eval.synthetic_kv_path={data}",
                 f"eval.num_samples={args.num_samples}",
                 f"eval.max_new_tokens={args.max_new_tokens}", "logging.progress=false"]  # fmt: skip
    variants = {
        "1 process": [sys.executable, "-m", "megatron_longact.cli"],
        f"{args.procs} processes": [
            sys.executable,
            "-m",
            "megatron_longact.runtime.launch",
            "--standalone",
            f"--nproc-per-node={args.procs}",
            "-m",
            "megatron_longact.cli",
        ],  # fmt: skip
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        order = list(variants) if repeat % 2 == 0 else list(reversed(variants))
        for name in order:
            out = work / f"{name.replace(' ', '_')}_{repeat}"
            times[name].append(_run(variants[name], overrides, out))
            print(f"  {name}, repeat {repeat}: {times[name][-1]:.1f} s", flush=True)
    one, many = (statistics.median(times[name]) for name in variants)
    same = [
        a == b
        for a, b in zip(_responses(work / "1_process_0"), _responses(work / f"{args.procs}_processes_0"))
    ]  # fmt: skip
    print(f"{len(lines)} prompts x (1 greedy + {args.num_samples} sampled), "
          f"{args.max_new_tokens} new tokens, {args.preset}")  # fmt: skip
    print(f"1 process: {one:.1f} s   {args.procs} processes: {many:.1f} s   "
          f"speed-up {one / many:.2f}x")  # fmt: skip
    print(f"identical predictions: greedy {same[0]}, sampled {same[1]}   (outputs in {work})")


if __name__ == "__main__":
    main()
