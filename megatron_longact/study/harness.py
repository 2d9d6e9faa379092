"""``longact study``: SFT once, then RL for every arm and seed; held-out accuracy and reward
curves, mean ± 95% CI per arm, one figure (paper Tables 1, 5, 6 as an ablation on any scale).

Every stage is a ``longact`` command in its own process (``--launcher`` prefixes it, e.g.
``"torchrun --nproc-per-node 8"`` on a GPU node), so the same command runs on a laptop and a
cluster. A stage whose output exists is skipped: a killed study resumes where it stopped.

Layout under ``--out``::

    sft/checkpoints, sft/tb, sft/eval              the one SFT run and its held-out score
    rl/<arm>-s<seed>/{checkpoints,tb,eval}         one RL run per arm and seed
    study.json, study.md, study.png                the aggregate
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megatron_longact.errors import UserError
from megatron_longact.study.stats import ArmSummary, format_table, mean_curve, summarize_arms

ARM_OVERRIDES = {
    "dense": ["longact.strategy=none"],
    "massive": ["longact.strategy=massive"],
    "min": ["longact.strategy=min"],
    "random": ["longact.strategy=random"],
}
"""Dotted overrides that make each arm (dense = every Q/K row trains, no LongAct mask)."""
ACCURACY_KEY = "KV-Acc"
"""The held-out synthetic key-value suite's accuracy column (percent)."""
REWARD_KEY = "rollout/reward_mean"
DONE_FILE = "done"
"""Written into a stage's folder when it finished, so a resumed study skips it."""


@dataclass(kw_only=True)
class StudyConfig:
    """Settings of ``longact study``."""

    sft_config: str
    """YAML of the SFT stage (e.g. examples/quickstart_cpu.yaml)."""
    rl_config: str
    """YAML of the RL stage; its longact.strategy is overridden per arm."""
    eval_data: str
    """RL JSONL of held-out key-value questions (``longact data`` writes rl_val.jsonl)."""
    out_dir: str
    """Everything goes under here."""
    arms: list[str] = field(default_factory=lambda: list(ARM_OVERRIDES))
    """Arms to compare (keys of :data:`ARM_OVERRIDES`)."""
    seeds: int = 3
    """RL seeds per arm: 1, 2, ... (see :func:`seed_overrides`)."""
    overrides: list[str] = field(default_factory=list)
    """Dotted overrides for all stages (e.g. model.preset=tiny-qwen3)."""
    sft_overrides: list[str] = field(default_factory=list)
    """Extra dotted overrides for the SFT stage only."""
    rl_overrides: list[str] = field(default_factory=list)
    """Extra dotted overrides for the RL stages only."""
    eval_overrides: list[str] = field(default_factory=list)
    """Extra dotted overrides for the eval stages (e.g. eval.max_new_tokens=64)."""
    launcher: str = ""
    """Command prefix for every stage (empty: run ``longact`` in one process)."""


def seed_overrides(seed: int) -> list[str]:
    """One seed for everything random in an RL run: init/dropout (train.seed), prompt order and
    rollout sampling (rl.seed), the random arm's draw (longact.seed). train.seed alone leaves
    the rollouts identical across seeds."""
    return [f"train.seed={seed}", f"rl.seed={seed}", f"longact.seed={seed}"]


def _run(command: list[str], *, log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"study: {shlex.join(command)}  (log: {log})", flush=True)
    start = time.time()
    with log.open("w") as handle:
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-5:])
        raise ValueError(f"stage failed (exit {result.returncode}), see {log}:\n{tail}")
    print(f"study: done in {time.time() - start:.0f} s", flush=True)


def _longact(config: StudyConfig, *args: str) -> list[str]:
    # torchrun and srun-wrapped python both accept "-m module".
    prefix = shlex.split(config.launcher) if config.launcher else [sys.executable]
    return [*prefix, "-m", "megatron_longact.cli", *args]


def _evaluate(config: StudyConfig, *, load_dir: Path, out: Path, name: str) -> float:
    scores = out / "synthetic_kv.scores.json"
    if not scores.is_file():
        _run(
            _longact(
                config,
                "eval",
                *config.overrides,
                "eval.suites=[synthetic_kv]",
                f"eval.synthetic_kv_path={config.eval_data}",
                f"checkpoint.load_dir={load_dir}",
                f"eval.model_name={name}",
                f"eval.out_dir={out}",
                *config.eval_overrides,
            ),  # fmt: skip
            log=out.parent / "eval.log",
        )
    return read_accuracy(scores)


def read_accuracy(scores_file: Path) -> float:
    """Held-out accuracy as a fraction from a ``synthetic_kv.scores.json``."""
    scores = json.loads(Path(scores_file).read_text())
    if ACCURACY_KEY not in scores:
        raise ValueError(f"{scores_file}: no {ACCURACY_KEY!r} (has {sorted(scores)})")
    return float(scores[ACCURACY_KEY]) / 100.0


def read_curve(metrics_jsonl: Path, *, key: str = REWARD_KEY) -> dict[int, float]:
    """``{step: value}`` of one metric from a run's ``metrics.jsonl`` (last write wins)."""
    curve = {}
    for line in Path(metrics_jsonl).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if key in record:
                curve[int(record["step"])] = float(record[key])
    return curve


@dataclass(kw_only=True)
class StudyResult:
    sft_accuracy: float
    accuracy: dict[str, dict[int, float]]
    """arm -> seed -> held-out accuracy (fraction)."""
    curves: dict[str, dict[int, dict[int, float]]]
    """arm -> seed -> {step: reward mean}."""


def run_study(config: StudyConfig) -> StudyResult:
    """Runs (or resumes) every stage and writes the aggregate. Single driver process."""
    bad = [a for a in config.arms if a not in ARM_OVERRIDES]
    if bad:
        raise UserError(f"--arms: {bad} not among {list(ARM_OVERRIDES)}")
    if config.seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {config.seeds}")
    out = Path(config.out_dir)
    sft = out / "sft"
    if not (sft / DONE_FILE).is_file():
        _run(_longact(config, "sft", "--config", config.sft_config, *config.overrides,
                      *config.sft_overrides,
                      f"checkpoint.save_dir={sft / 'checkpoints'}",
                      f"logging.tensorboard_dir={sft / 'tb'}"),  # fmt: skip
             log=sft / "sft.log")  # fmt: skip
        (sft / DONE_FILE).write_text("")
    sft_accuracy = _evaluate(config, load_dir=sft / "checkpoints", out=sft / "eval", name="SFT")
    print(f"study: SFT held-out accuracy {100 * sft_accuracy:.1f}%", flush=True)
    accuracy: dict[str, dict[int, float]] = {}
    curves: dict[str, dict[int, dict[int, float]]] = {}
    for arm in config.arms:
        for seed in range(1, config.seeds + 1):
            run = out / "rl" / f"{arm}-s{seed}"
            if not (run / DONE_FILE).is_file():
                _run(_longact(config, "rl", "--config", config.rl_config, *config.overrides,
                              *config.rl_overrides,
                              *ARM_OVERRIDES[arm], *seed_overrides(seed),
                              f"checkpoint.load_dir={sft / 'checkpoints'}",
                              f"checkpoint.save_dir={run / 'checkpoints'}",
                              f"logging.tensorboard_dir={run / 'tb'}"),  # fmt: skip
                     log=run / "rl.log")  # fmt: skip
                (run / DONE_FILE).write_text("")
            acc = _evaluate(config, load_dir=run / "checkpoints", out=run / "eval",
                            name=f"{arm} seed {seed}")  # fmt: skip
            accuracy.setdefault(arm, {})[seed] = acc
            curves.setdefault(arm, {})[seed] = read_curve(run / "tb" / "metrics.jsonl")
            print(f"study: {arm} seed {seed}: held-out accuracy {100 * acc:.1f}%", flush=True)
    result = StudyResult(sft_accuracy=sft_accuracy, accuracy=accuracy, curves=curves)
    write_report(result, out=out, config=config)
    return result


def arm_summaries(result: StudyResult) -> list[ArmSummary]:
    return summarize_arms({arm: list(per.values()) for arm, per in result.accuracy.items()})


def write_report(result: StudyResult, *, out: Path, config: StudyConfig) -> None:
    """study.json, study.md (the table) and study.png (curves and accuracies)."""
    summaries = arm_summaries(result)
    table = format_table(summaries, metric="held-out accuracy %")
    header = f"SFT model (start of every RL run): {100 * result.sft_accuracy:.1f}% held-out.\n\n"
    (out / "study.md").write_text(header + table)
    payload = {
        "config": asdict(config),
        "result": asdict(result),
        "summary": [asdict(s) for s in summaries],
    }
    (out / "study.json").write_text(json.dumps(payload, indent=2) + "\n")
    plot_study(result, out / "study.png")
    print(header + table, flush=True)


def plot_study(result: StudyResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    summaries = {s.arm: s for s in arm_summaries(result)}
    for index, (arm, per_seed) in enumerate(result.curves.items()):
        curve = mean_curve([c for c in per_seed.values() if c])
        if not curve:
            continue
        steps = sorted(curve)
        mean = [curve[s][0] for s in steps]
        band = [0.0 if curve[s][1] != curve[s][1] else curve[s][1] for s in steps]
        (line,) = left.plot(steps, mean, label=arm)
        left.fill_between(steps, [m - b for m, b in zip(mean, band)],
                          [m + b for m, b in zip(mean, band)], alpha=0.2,
                          color=line.get_color())  # fmt: skip
        s = summaries[arm]
        ci = 0.0 if s.ci95 != s.ci95 else 100 * s.ci95
        right.bar(index, 100 * s.mean, yerr=ci, capsize=4, color=line.get_color())
        right.scatter([index] * s.n, [100 * v for v in s.values], color="black", s=10, zorder=3)
    right.axhline(100 * result.sft_accuracy, color="gray", linestyle="--", label="SFT")
    right.set_xticks(range(len(result.curves)), list(result.curves))
    right.set_ylabel("held-out accuracy (%)")
    right.set_title("after RL (mean ± 95% CI, dots = seeds)")
    right.legend()
    left.set_xlabel("RL step")
    left.set_ylabel("mean reward (all rollouts)")
    left.set_title("reward (mean ± 95% CI over seeds)")
    left.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """``longact study --sft-config A --rl-config B --eval-data C --out D [overrides]``."""
    parser = argparse.ArgumentParser(
        prog="longact study", description="SFT once, then RL per arm and seed; mean ± 95% CI"
    )
    parser.add_argument("--sft-config", required=True)
    parser.add_argument("--rl-config", required=True)
    parser.add_argument("--eval-data", required=True, help="held-out RL JSONL (rl_val.jsonl)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--arms", default=",".join(ARM_OVERRIDES))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--launcher", default="", help='e.g. "torchrun --nproc-per-node 8"')
    parser.add_argument("--sft-override", action="append", default=[],
                        help="dotted override for the SFT stage only (repeatable)")  # fmt: skip
    parser.add_argument("--rl-override", action="append", default=[],
                        help="dotted override for the RL stages only (repeatable)")  # fmt: skip
    parser.add_argument("--eval-override", action="append", default=[],
                        help="dotted override for the eval stages only (repeatable)")  # fmt: skip
    parser.add_argument("overrides", nargs="*", help="dotted overrides for every stage")
    args = parser.parse_args(argv)
    for flag, path in (("--sft-config", args.sft_config), ("--rl-config", args.rl_config),
                       ("--eval-data", args.eval_data)):  # fmt: skip
        if not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path}: no such file")
    config = StudyConfig(
        sft_config=args.sft_config, rl_config=args.rl_config, eval_data=args.eval_data,
        out_dir=args.out, arms=[a.strip() for a in args.arms.split(",") if a.strip()],
        seeds=args.seeds, overrides=args.overrides, sft_overrides=args.sft_override,
        rl_overrides=args.rl_override, eval_overrides=args.eval_override,
        launcher=args.launcher,
    )  # fmt: skip
    run_study(config)
    return 0
