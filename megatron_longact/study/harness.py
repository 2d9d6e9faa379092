"""``longact study``: SFT once, then RL for every arm and seed; held-out accuracy and reward
curves, mean ± 95% CI per arm, one figure (paper Tables 1, 5, 6 as an ablation on any scale).

Held-out accuracy is measured inside every RL run (``rl.heldout``, ``rl.eval_interval``): the
mean over ``--num-samples`` samples per prompt at temperature 1 (mean@k) and a greedy answer,
scored with the training reward, at step 0 (the SFT model: every run starts there with the same
evaluation seed, so all runs report the same step-0 value) and every ``--eval-interval`` steps.
Sampled accuracy is the lens that moves at small scale; greedy accuracy stays within its noise.

Every stage is a ``longact`` command in its own process (``--launcher`` prefixes it, e.g.
``"torchrun --nproc-per-node 8"`` on a GPU node), so the same command runs on a laptop and a
cluster. A stage whose output exists is skipped: a killed study resumes where it stopped.

Layout under ``--out``::

    sft/checkpoints, sft/tb                        the one SFT run
    rl/<arm>-s<seed>/{checkpoints,tb}              one RL run per arm and seed (tb/metrics.jsonl
                                                   holds the reward and held-out curves)
    study.json, study.md, study.png                the aggregate
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megatron_longact.errors import UserError
from megatron_longact.study.stats import (
    ArmSummary,
    format_table,
    mean_curve,
    seed_arm_split,
    summarize,
    summarize_arms,
)

ARM_OVERRIDES = {
    "dense": ["longact.strategy=none"],
    "massive": ["longact.strategy=massive"],
    "min": ["longact.strategy=min"],
    "random": ["longact.strategy=random"],
    "massive-0.1": ["longact.strategy=massive", "longact.ratio=0.1"],
    "massive-0.3": ["longact.strategy=massive", "longact.ratio=0.3"],
    "massive-0.5": ["longact.strategy=massive", "longact.ratio=0.5"],
}
"""Dotted overrides that make each arm (dense = every Q/K row trains, no LongAct mask; massive,
min and random keep the RL config's longact.ratio; massive-<lambda> sets it, paper Table 6)."""
DEFAULT_ARMS = ("dense", "massive", "min", "random")
ACCURACY_KEY = "KV-Acc"
"""The held-out synthetic key-value suite's accuracy column (percent) of ``longact eval``."""
REWARD_KEY = "rollout/reward_mean"
HELDOUT_KEY = "heldout/accuracy"
"""mean@k held-out accuracy (fraction) that ``rl.heldout`` logs."""
HELDOUT_SE_KEY = "heldout/accuracy_se"
GREEDY_KEY = "heldout/greedy_accuracy"
DONE_FILE = "done"
"""Written into a stage's folder when it finished, so a resumed study skips it."""
CLAIM_FILE = "claimed"
"""The pid of the driver training a run (:func:`claim`)."""


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
    arms: list[str] = field(default_factory=lambda: list(DEFAULT_ARMS))
    """Arms to compare (keys of :data:`ARM_OVERRIDES`)."""
    seeds: int = 3
    """RL seeds per arm: 1, 2, ... (see :func:`seed_overrides`)."""
    eval_interval: int = 25
    """Held-out evaluation every this many RL steps (``rl.eval_interval``), also at 0 and last."""
    num_samples: int = 8
    """Samples per held-out prompt (``eval.num_samples``): the mean@k of the table."""
    eval_prompts: int | None = None
    """Held-out prompts: the first N of ``eval_data`` (None: all)."""
    parallel: int = 1
    """RL runs at once (each its own process): >1 fills a many-core CPU machine."""
    overrides: list[str] = field(default_factory=list)
    """Dotted overrides for all stages (e.g. model.preset=tiny-qwen3)."""
    sft_overrides: list[str] = field(default_factory=list)
    """Extra dotted overrides for the SFT stage only."""
    rl_overrides: list[str] = field(default_factory=list)
    """Extra dotted overrides for the RL stages only."""
    eval_overrides: list[str] = field(default_factory=list)
    """Extra ``eval.*`` overrides of the held-out evaluation (e.g. eval.sample_temperature=0.7)."""
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
    """Held-out mean@k of the SFT model (the runs' step-0 evaluation), fraction."""
    accuracy: dict[str, dict[int, float]]
    """arm -> seed -> held-out mean@k after the last step (fraction)."""
    curves: dict[str, dict[int, dict[int, float]]]
    """arm -> seed -> {step: reward mean of all rollouts}."""
    heldout: dict[str, dict[int, dict[int, float]]] = field(default_factory=dict)
    """arm -> seed -> {step: held-out mean@k}, step 0 included."""
    greedy: dict[str, dict[int, float]] = field(default_factory=dict)
    """arm -> seed -> held-out greedy accuracy after the last step (fraction)."""
    eval_se: dict[str, dict[int, float]] = field(default_factory=dict)
    """arm -> seed -> standard error of that run's final mean@k over prompts (fraction)."""
    sft_greedy: float = float("nan")
    pass_at_k: dict[str, dict[int, float]] = field(default_factory=dict)
    """arm -> seed -> held-out pass@k after the last step (fraction; nan if not logged)."""


def _rl_command(config: StudyConfig, arm: str, seed: int, *, sft: Path, run: Path) -> list[str]:
    # Step 0 is the same SFT model under the same evaluation seed in every run: one run (the
    # first job) evaluates it, the others start at their first interval.
    first = (arm, seed) == (config.arms[0], 1)
    heldout = [
        f"rl.eval_interval={config.eval_interval}",
        f"rl.eval_at_start={str(first).lower()}",
        f"eval.synthetic_kv_path={config.eval_data}",
        f"eval.num_samples={config.num_samples}",
    ]
    if config.eval_prompts is not None:
        heldout.append(f"rl.eval_num_prompts={config.eval_prompts}")
    return _longact(config, "rl", "--config", config.rl_config, *config.overrides,
                    *config.rl_overrides, *ARM_OVERRIDES[arm], *seed_overrides(seed), *heldout,
                    *config.eval_overrides,
                    f"checkpoint.load_dir={sft / 'checkpoints'}",
                    f"checkpoint.save_dir={run / 'checkpoints'}",
                    f"logging.tensorboard_dir={run / 'tb'}")  # fmt: skip


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(run: Path) -> bool:
    """Whether this driver may train ``run``: no other live process holds its ``claimed`` file
    (a pid). Lets several drivers (one per node, or a second one on a busy machine) share one
    ``--out``; a claim of a dead process is taken over, so a killed study still resumes."""
    run.mkdir(parents=True, exist_ok=True)
    file = run / CLAIM_FILE
    if file.is_file():
        pid = int(file.read_text().strip() or 0)
        if pid not in (0, os.getpid()) and _alive(pid):
            return False
    file.write_text(f"{os.getpid()}\n")
    return True


def _train_rl(config: StudyConfig, arm: str, seed: int, *, sft: Path, run: Path) -> None:
    if not (run / DONE_FILE).is_file() and claim(run):
        _run(_rl_command(config, arm, seed, sft=sft, run=run), log=run / "rl.log")
        (run / DONE_FILE).write_text("")


def run_study(config: StudyConfig) -> StudyResult:
    """Runs (or resumes) every stage and writes the aggregate. Single driver process; RL runs
    go ``config.parallel`` at a time, seed-major (every arm's seed 1 first)."""
    bad = [a for a in config.arms if a not in ARM_OVERRIDES]
    if bad:
        raise UserError(f"--arms: {bad} not among {list(ARM_OVERRIDES)}")
    if config.seeds < 1 or config.parallel < 1 or config.eval_interval < 1:
        raise UserError("--seeds, --parallel and --eval-interval must be at least 1")
    out = Path(config.out_dir)
    sft = out / "sft"
    if not (sft / DONE_FILE).is_file():
        _run(_longact(config, "sft", "--config", config.sft_config, *config.overrides,
                      *config.sft_overrides,
                      f"checkpoint.save_dir={sft / 'checkpoints'}",
                      f"logging.tensorboard_dir={sft / 'tb'}"),  # fmt: skip
             log=sft / "sft.log")  # fmt: skip
        (sft / DONE_FILE).write_text("")
    jobs = [(arm, seed) for seed in range(1, config.seeds + 1) for arm in config.arms]
    with ThreadPoolExecutor(max_workers=config.parallel) as pool:
        futures = [
            pool.submit(_train_rl, config, arm, seed, sft=sft, run=out / "rl" / f"{arm}-s{seed}")
            for arm, seed in jobs
        ]
        for future in futures:
            future.result()
    result = collect(out, arms=config.arms, seeds=range(1, config.seeds + 1),
                     num_samples=config.num_samples)  # fmt: skip
    write_report(result, out=out, config=config)
    return result


def collect(out: Path, *, arms, seeds, num_samples: int = 8) -> StudyResult:
    """The finished runs' curves and final held-out scores under ``out/rl`` (missing runs are
    left out, so a partial study can be reported); ``num_samples`` is the k of pass@k."""
    result = StudyResult(sft_accuracy=float("nan"), accuracy={}, curves={})
    for arm in arms:
        for seed in seeds:
            metrics = out / "rl" / f"{arm}-s{seed}" / "tb" / "metrics.jsonl"
            if not (metrics.parent.parent / DONE_FILE).is_file():
                continue
            heldout = read_curve(metrics, key=HELDOUT_KEY)
            last = max(heldout)
            result.accuracy.setdefault(arm, {})[seed] = heldout[last]
            result.heldout.setdefault(arm, {})[seed] = heldout
            result.curves.setdefault(arm, {})[seed] = read_curve(metrics)
            result.greedy.setdefault(arm, {})[seed] = read_curve(metrics, key=GREEDY_KEY)[last]
            result.eval_se.setdefault(arm, {})[seed] = read_curve(metrics, key=HELDOUT_SE_KEY)[last]
            pass_k = read_curve(metrics, key=f"heldout/pass@{num_samples}")
            result.pass_at_k.setdefault(arm, {})[seed] = pass_k.get(last, float("nan"))
            if 0 in heldout and result.sft_accuracy != result.sft_accuracy:  # step 0: the SFT model
                result.sft_accuracy = heldout[0]
                result.sft_greedy = read_curve(metrics, key=GREEDY_KEY)[0]
    if not result.accuracy:
        raise ValueError(f"{out / 'rl'}: no finished RL run to report")
    if result.sft_accuracy == result.sft_accuracy:  # runs that skipped step 0 start there too
        for per_seed in result.heldout.values():
            for curve in per_seed.values():
                curve.setdefault(0, result.sft_accuracy)
    return result


def arm_summaries(result: StudyResult) -> list[ArmSummary]:
    return summarize_arms({arm: list(per.values()) for arm, per in result.accuracy.items()})


def _ends(curve: dict[int, float], window: int) -> tuple[float, float]:
    """Mean reward of the first and of the last ``window`` logged steps."""
    values = [curve[step] for step in sorted(curve)]
    return statistics.fmean(values[:window]), statistics.fmean(values[-window:])


def _ci_text(summary: ArmSummary, scale: float = 100.0, digits: int = 1) -> str:
    return "n/a" if summary.ci95 != summary.ci95 else f"{scale * summary.ci95:.{digits}f}"


def details_table(result: StudyResult, *, window: int = 10) -> str:
    """Markdown: per arm, the gain over the SFT model's mean@k, greedy accuracy (each mean ±
    95% CI over seeds), the mean per-run evaluation SE, and the reward at both ends of the run
    (mean of the first and last ``window`` steps, averaged over seeds); percent."""
    lines = [f"| arm | gain vs SFT, mean@k (pp) | greedy % | eval SE per run (pp) | "
             f"reward, first -> last {window} steps |", "|---|---|---|---|---|"]  # fmt: skip
    for arm, per_seed in result.accuracy.items():
        gain = summarize([v - result.sft_accuracy for v in per_seed.values()], arm=arm)
        greedy = summarize(list(result.greedy[arm].values()), arm=arm)
        ends = [_ends(c, window) for c in result.curves[arm].values() if c]
        first, last = (statistics.fmean(e[i] for e in ends) for i in (0, 1))
        lines.append(
            f"| {arm} | {100 * gain.mean:+.1f} ± {_ci_text(gain)} | {100 * greedy.mean:.1f} ± "
            f"{_ci_text(greedy)} | {100 * statistics.fmean(result.eval_se[arm].values()):.1f} | "
            f"{first:.3f} -> {last:.3f} |"
        )
    return "\n".join(lines) + "\n"


def paired_table(result: StudyResult) -> str:
    """Markdown: every arm minus the first arm (the baseline, e.g. dense) on the seeds both
    finished, final held-out mean@k, mean ± 95% CI over seeds, percentage points. Runs of one
    seed see the same prompts in the same order and are evaluated on the same prompts, so the
    per-seed difference removes both from the comparison."""
    arms = list(result.accuracy)
    if len(arms) < 2:
        return ""
    base = arms[0]
    lines = [f"| arm - {base} | seeds | mean@k difference, pp (mean ± 95% CI) | per seed |",
             "|---|---|---|---|"]  # fmt: skip
    for arm in arms[1:]:
        seeds = sorted(set(result.accuracy[arm]) & set(result.accuracy[base]))
        if not seeds:
            continue
        diffs = [result.accuracy[arm][s] - result.accuracy[base][s] for s in seeds]
        d = summarize(diffs, arm=arm)
        per_seed = ", ".join(f"{100 * v:+.1f}" for v in diffs)
        lines.append(f"| {arm} | {d.n} | {100 * d.mean:+.1f} ± {_ci_text(d)} | {per_seed} |")
    return "\n".join(lines) + "\n"


def split_table(result: StudyResult) -> str:
    """Markdown: the final held-out mean@k split into arm, seed and residual
    (:func:`~megatron_longact.study.stats.seed_arm_split`) over the seeds every arm finished,
    and the seeds per arm a paired arm difference of ±1 and ±2 pp (95%) would need. Empty
    with fewer than 2 arms or 2 common seeds."""
    arms = list(result.accuracy)
    seeds = sorted(set.intersection(*(set(result.accuracy[a]) for a in arms))) if arms else []
    if len(arms) < 2 or len(seeds) < 2:
        return ""
    split = seed_arm_split([[100 * result.accuracy[a][s] for s in seeds] for a in arms])
    res_dof = (split.arms - 1) * (split.seeds - 1)
    return "\n".join([
        f"| final mean@k, {split.arms} arms x {split.seeds} seeds | share of variance | F (dof) |",
        "|---|---|---|",
        f"| arm | {split.share_arm:.0%} | {split.f_arm:.2f} ({split.arms - 1}, {res_dof}) |",
        f"| seed | {split.share_seed:.0%} | {split.f_seed:.2f} ({split.seeds - 1}, {res_dof}) |",
        f"| residual | {split.share_residual:.0%} | sd {split.residual_sd:.2f} pp |",
        "",
        f"A difference between two arms paired by seed, to ±1 pp (95%): "
        f"{split.seeds_for(1.0)} seeds per arm; to ±2 pp: {split.seeds_for(2.0)}.",
    ]) + "\n"  # fmt: skip


def _runs(result: StudyResult) -> list[tuple[str, int]]:
    return [(arm, seed) for arm, per_seed in result.accuracy.items() for seed in sorted(per_seed)]


def gain_table(result: StudyResult, *, window: int = 10) -> str:
    """Markdown: the change over the SFT model pooled over every finished run, whatever its
    arm (does RL move the held-out metric at all?): per evaluated step the mean@k gain, mean ±
    95% CI over runs, its sd, range and how many runs gained; then the last step's greedy
    gain and the reward's last-minus-first ``window`` steps. Percentage points (reward: its
    own units)."""
    runs = _runs(result)
    steps = sorted({s for a, r in runs for s in result.heldout[a][r]} - {0})
    lines = ["| all runs, vs SFT | runs | mean ± 95% CI | sd | range | runs gaining |",
             "|---|---|---|---|---|---|"]  # fmt: skip

    def row(name: str, values: list[float], scale: float, digits: int) -> str:
        s = summarize(values, arm=name)
        gaining = sum(v > 0 for v in values)
        sd = statistics.stdev(values) if len(values) > 1 else float("nan")
        return (
            f"| {name} | {s.n} | {scale * s.mean:+.{digits}f} ± {_ci_text(s, scale, digits)} | "
            f"{scale * sd:.{digits}f} | {scale * min(values):+.{digits}f} .. "
            f"{scale * max(values):+.{digits}f} | {gaining} of {s.n} |"
        )

    for step in steps:
        gains = [result.heldout[a][r][step] - result.sft_accuracy for a, r in runs
                 if step in result.heldout[a][r]]  # fmt: skip
        lines.append(row(f"mean@k at step {step}, pp", gains, 100.0, 1))
    if result.sft_greedy == result.sft_greedy:
        greedy = [result.greedy[a][r] - result.sft_greedy for a, r in runs]
        lines.append(row("greedy at the last step, pp", greedy, 100.0, 1))
    rewards = [_ends(result.curves[a][r], window) for a, r in runs if result.curves[a][r]]
    if rewards:
        lines.append(row(f"reward, last - first {window} steps", [b - a for a, b in rewards],
                         1.0, 3))  # fmt: skip
    return "\n".join(lines) + "\n"


def runs_table(result: StudyResult, *, window: int = 10, num_samples: int = 8) -> str:
    """Markdown: one row per finished run: held-out mean@k at every evaluated step (± the
    run's evaluation SE at the last), greedy and pass@k at the last step (percent), and the
    reward of the first and last ``window`` steps."""
    runs = _runs(result)
    steps = sorted({s for a, r in runs for s in result.heldout[a][r]} - {0})
    head = " | ".join(f"mean@{num_samples} at {s}" for s in steps)
    lines = [f"| run | {head} | greedy at last | pass@{num_samples} at last | "
             f"reward, first -> last {window} steps |", "|" + "---|" * (len(steps) + 4)]  # fmt: skip
    for arm, seed in runs:
        curve = result.heldout[arm][seed]
        cells = [f"{100 * curve[s]:.1f}" if s in curve else "-" for s in steps]
        cells[-1] += f" ± {100 * result.eval_se[arm][seed]:.1f}"
        first, last = _ends(result.curves[arm][seed], window) if result.curves[arm][seed] else (
            float("nan"), float("nan"))  # fmt: skip
        lines.append(
            f"| {arm}-s{seed} | {' | '.join(cells)} | {100 * result.greedy[arm][seed]:.1f} | "
            f"{100 * result.pass_at_k.get(arm, {}).get(seed, float('nan')):.1f} | "
            f"{first:.3f} -> {last:.3f} |"
        )
    return "\n".join(lines) + "\n"


def write_report(result: StudyResult, *, out: Path, config: StudyConfig) -> None:
    """study.json, study.md (the tables) and study.png (curves and accuracies)."""
    summaries = arm_summaries(result)
    k = config.num_samples
    table = format_table(summaries, metric=f"held-out mean@{k} %")
    header = (
        f"SFT model (step 0 of every RL run): {100 * result.sft_accuracy:.1f}% held-out mean@{k}, "
        f"{100 * result.sft_greedy:.1f}% greedy.\n\n"
    )
    text = "\n".join([header + table, details_table(result), paired_table(result),
                      split_table(result), gain_table(result),
                      runs_table(result, num_samples=k)])  # fmt: skip
    (out / "study.md").write_text(text)
    payload = {
        "config": asdict(config),
        "result": asdict(result),
        "summary": [asdict(s) for s in summaries],
    }
    (out / "study.json").write_text(json.dumps(payload, indent=2) + "\n")
    plot_study(result, out / "study.png", num_samples=k)
    print(text, flush=True)


def _smooth(curve: dict[int, float], window: int) -> dict[int, float]:
    """Trailing moving average over ``window`` logged steps (one step's reward is noisy)."""
    steps = sorted(curve)
    return {s: statistics.fmean(curve[t] for t in steps[max(0, i - window + 1) : i + 1])
            for i, s in enumerate(steps)}  # fmt: skip


def _band(axis, per_seed: dict[int, dict[int, float]], *, label: str, color=None):
    curve = mean_curve([c for c in per_seed.values() if c])
    steps = sorted(curve)
    mean = [curve[s][0] for s in steps]
    band = [0.0 if curve[s][1] != curve[s][1] else curve[s][1] for s in steps]
    (line,) = axis.plot(steps, mean, label=label, color=color)
    axis.fill_between(steps, [m - b for m, b in zip(mean, band)],
                      [m + b for m, b in zip(mean, band)], alpha=0.15,
                      color=line.get_color())  # fmt: skip
    return line.get_color()


def plot_study(result: StudyResult, path: Path, *, num_samples: int = 8) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (reward_ax, heldout_ax, bars) = plt.subplots(1, 3, figsize=(15, 4))
    summaries = {s.arm: s for s in arm_summaries(result)}
    for index, (arm, per_seed) in enumerate(result.curves.items()):
        smoothed = {seed: _smooth(c, 10) for seed, c in per_seed.items() if c}
        color = _band(reward_ax, smoothed, label=arm)
        if result.heldout.get(arm):
            percent = {
                k: {s: 100 * v for s, v in c.items()} for k, c in result.heldout[arm].items()
            }
            _band(heldout_ax, percent, label=arm, color=color)
        s = summaries[arm]
        ci = 0.0 if s.ci95 != s.ci95 else 100 * s.ci95
        bars.bar(index, 100 * s.mean, yerr=ci, capsize=4, color=color)
        bars.scatter([index] * s.n, [100 * v for v in s.values], color="black", s=10, zorder=3)
    for axis in (heldout_ax, bars):
        axis.axhline(100 * result.sft_accuracy, color="gray", linestyle="--", label="SFT")
    lowest = min([result.sft_accuracy, *(v for s in summaries.values() for v in s.values)])
    bars.set_ylim(bottom=max(0.0, 100 * lowest - 10))  # the differences, not the zero line
    bars.set_xticks(range(len(result.curves)), list(result.curves), rotation=30)
    bars.set_ylabel(f"held-out mean@{num_samples} (%)")
    bars.set_title("after RL (mean ± 95% CI, dots = seeds)")
    heldout_ax.set_xlabel("RL step")
    heldout_ax.set_ylabel(f"held-out mean@{num_samples} (%)")
    heldout_ax.set_title("held-out accuracy (mean ± 95% CI over seeds)")
    heldout_ax.legend(fontsize=8)
    reward_ax.set_xlabel("RL step")
    reward_ax.set_ylabel("mean reward, all rollouts (10-step average)")
    reward_ax.set_title("training reward (mean ± 95% CI over seeds)")
    reward_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
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
    parser.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                        help=f"comma-separated, of {','.join(ARM_OVERRIDES)}")  # fmt: skip
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--eval-interval", type=int, default=25,
                        help="held-out evaluation every N RL steps, at 0 and the end")  # fmt: skip
    parser.add_argument("--num-samples", type=int, default=8, help="k of the held-out mean@k")
    parser.add_argument("--eval-prompts", type=int, default=None,
                        help="held-out prompts: the first N of --eval-data (all)")  # fmt: skip
    parser.add_argument("--parallel", type=int, default=1, help="RL runs at once")
    parser.add_argument("--report-only", action="store_true",
                        help="aggregate the finished runs; start nothing")  # fmt: skip
    parser.add_argument("--launcher", default="", help='e.g. "torchrun --nproc-per-node 8"')
    parser.add_argument("--sft-override", action="append", default=[],
                        help="dotted override for the SFT stage only (repeatable)")  # fmt: skip
    parser.add_argument("--rl-override", action="append", default=[],
                        help="dotted override for the RL stages only (repeatable)")  # fmt: skip
    parser.add_argument("--eval-override", action="append", default=[],
                        help="eval.* override of the held-out evaluation (repeatable)")  # fmt: skip
    parser.add_argument("overrides", nargs="*", help="dotted overrides for every stage")
    args = parser.parse_args(argv)
    for flag, path in (("--sft-config", args.sft_config), ("--rl-config", args.rl_config),
                       ("--eval-data", args.eval_data)):  # fmt: skip
        if not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path}: no such file")
    config = StudyConfig(
        sft_config=args.sft_config, rl_config=args.rl_config, eval_data=args.eval_data,
        out_dir=args.out, arms=[a.strip() for a in args.arms.split(",") if a.strip()],
        seeds=args.seeds, eval_interval=args.eval_interval, num_samples=args.num_samples,
        eval_prompts=args.eval_prompts, parallel=args.parallel, overrides=args.overrides,
        sft_overrides=args.sft_override, rl_overrides=args.rl_override,
        eval_overrides=args.eval_override, launcher=args.launcher,
    )  # fmt: skip
    if args.report_only:
        result = collect(Path(config.out_dir), arms=config.arms,
                         seeds=range(1, config.seeds + 1), num_samples=config.num_samples)  # fmt: skip
        write_report(result, out=Path(config.out_dir), config=config)
    else:
        run_study(config)
    return 0
