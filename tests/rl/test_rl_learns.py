"""RL learns: from a quickly trained SFT checkpoint, N DAPO + LongAct steps raise the mean
training reward of the last steps above that of the first steps by a margin set from the
measured seed-to-seed spread, so a regression that stops learning (no update, a wrong-signed
advantage, a mask that freezes everything) fails CI.

In the spirit of verl's end-to-end checks (``tests/e2e/check_results.py``: the digit-completion
run's best ``critic/rewards/mean`` must exceed a threshold), with the threshold on the gain and
derived from measured runs instead of fixed by hand.

Measured spread (``python tests/rl/test_rl_learns.py``: the same SFT checkpoint, 5 seeds per
learning rate, one thread per process; gain = mean reward of steps 16-20 minus steps 1-5):

- lr 1e-3 (the test's recipe): gains 0.613, 0.275, 0.462, 0.562, 0.662 (mean 0.515, sd 0.153);
- lr 0 (the same run, no update: a run that does not learn): gains -0.013, -0.050, 0.025, 0.000,
  0.000 (mean -0.008, sd 0.027).

MARGIN = 0.1 lies 4.0 null standard deviations above the null mean (a non-learning run passes
with probability ~3e-5 under a normal approximation) and 2.7 learning standard deviations below
the learning mean (a healthy seed fails with probability ~0.4%); the test's seed measured 0.613.
The run also logs the periodic held-out evaluation (``rl.eval_interval``), checked for presence.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

from megatron_longact.runtime.launch import run_local

STEPS = 20
WINDOW = 5
"""Steps averaged at each end: one step's reward mean (16 samples) is too noisy alone."""
LEARN_GAINS = (0.613, 0.275, 0.462, 0.562, 0.662)
NULL_GAINS = (-0.013, -0.050, 0.025, 0.000, 0.000)
MARGIN = 0.1


def _job(overrides: list[str], command: str):
    from megatron_longact.config import JobConfig, load_config
    from megatron_longact.rl.loop import run_rl
    from megatron_longact.sft.loop import run_sft

    job = load_config(JobConfig, None, overrides)
    return (run_sft if command == "sft" else run_rl)(job)


def make_data(out: Path) -> Path:
    from megatron_longact.data.make_synthetic import main

    main(["--out-dir", str(out), "--context-tokens", "96", "--sft-train", "48", "--sft-val",
          "8", "--rl-train", "64", "--rl-val", "8", "--seed", "7"])  # fmt: skip
    return out


def train_sft(data: Path, out: Path) -> Path:
    """The SFT cold start of ``tests/rl/test_rl_e2e.py``: the micro model learns the reply
    template partly (format reward ~0.5), which leaves RL a signal to climb."""
    run_local(_job, 1, [
        "model.preset=micro-qwen3", f"data.train_path={data / 'sft_train.jsonl'}",
        "data.seq_length=256", "data.micro_batch_size=4", "data.global_batch_size=8",
        "optim.lr=3e-3", "optim.min_lr=3e-4", "train.train_steps=120",
        f"checkpoint.save_dir={out / 'ckpt'}", f"logging.tensorboard_dir={out / 'tb'}",
        "logging.progress=false",
    ], "sft")  # fmt: skip
    return out / "ckpt"


def reward_gain(
    data: Path, sft: Path, out: Path, *, seed: int, lr: float = 1e-3, held_out: tuple = ()
) -> float:
    """Mean training reward of the last WINDOW steps minus that of the first WINDOW steps.
    ``held_out``: extra overrides (the periodic held-out evaluation; its sampling has its own
    generator and leaves the training run unchanged)."""
    run_local(_job, 1, [
        "model.preset=micro-qwen3", f"data.train_path={data / 'rl_train.jsonl'}",
        f"checkpoint.load_dir={sft}", f"checkpoint.save_dir={out / 'ckpt'}",
        f"logging.tensorboard_dir={out / 'tb'}", "logging.progress=false",
        f"optim.lr={lr}", f"optim.min_lr={lr}", "optim.warmup_steps=0", "optim.adam_beta2=0.99",
        f"train.train_steps={STEPS}", "data.micro_batch_size=8", "checkpoint.save_interval=1000",
        "rl.prompts_per_step=4", "rl.rollouts_per_prompt=4", "rl.max_new_tokens=40",
        "rl.max_seq_length=256", "rl.dynamic_sampling=false",
        "longact.strategy=massive", "longact.ratio=0.3",
        f"train.seed={seed}", f"rl.seed={seed}", f"longact.seed={seed}",
        *held_out,
    ], "rl")  # fmt: skip
    lines = [json.loads(line) for line in (out / "tb" / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["rollout/reward_mean"] for r in lines if "rollout/reward_mean" in r]
    assert len(rewards) == STEPS, rewards
    return statistics.fmean(rewards[-WINDOW:]) - statistics.fmean(rewards[:WINDOW])


@pytest.mark.slow
def test_rl_raises_the_training_reward_beyond_the_seed_spread(tmp_path):
    data = make_data(tmp_path / "data")
    sft = train_sft(data, tmp_path / "sft")
    held_out = ("rl.eval_interval=10", f"eval.synthetic_kv_path={data / 'rl_val.jsonl'}",
                "eval.num_samples=4")  # fmt: skip
    gain = reward_gain(data, sft, tmp_path / "rl", seed=1, held_out=held_out)
    lines = (tmp_path / "rl" / "tb" / "metrics.jsonl").read_text().splitlines()
    evaluated = [r["step"] for r in map(json.loads, lines) if "heldout/accuracy" in r]
    assert evaluated == [0, 10, 20], evaluated
    assert gain > MARGIN, (
        f"RL reward gain {gain:.3f} over {STEPS} steps is below {MARGIN} (learning runs measured "
        f"{LEARN_GAINS}, non-learning lr=0 runs {NULL_GAINS})"
    )


if __name__ == "__main__":  # the measurement behind MARGIN: python tests/rl/test_rl_learns.py
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/rl_learns")
    data, sft = make_data(root / "data"), train_sft(root / "data", root / "sft")
    for lr in (1e-3, 0.0):
        gains = [reward_gain(data, sft, root / f"lr{lr}-s{s}", seed=s, lr=lr) for s in range(1, 6)]
        print(f"lr {lr}: gains {[round(g, 3) for g in gains]} mean {statistics.fmean(gains):.3f} "
              f"sd {statistics.stdev(gains):.3f}", flush=True)  # fmt: skip
