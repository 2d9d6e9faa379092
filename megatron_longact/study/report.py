"""The study's aggregate: per-run curves read back from ``metrics.jsonl``, the report's tables
(per arm, paired by seed, arm/seed split, pooled, per run), ``study.json`` and the figure.
Everything here works on finished runs only (``longact study --report-only``); running them is
:mod:`megatron_longact.study.harness`.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_longact.study.stats import (
    ArmSummary,
    format_table,
    mean_curve,
    seed_arm_split,
    summarize,
    summarize_arms,
)

if TYPE_CHECKING:
    from megatron_longact.study.harness import StudyConfig

REWARD_KEY = "rollout/reward_mean"
HELDOUT_KEY = "heldout/accuracy"
"""mean@k held-out accuracy (fraction) that ``rl.heldout`` logs."""
HELDOUT_SE_KEY = "heldout/accuracy_se"
GREEDY_KEY = "heldout/greedy_accuracy"


def read_curves(metrics_jsonl: Path, keys) -> dict[str, dict[int, float]]:
    """``{key: {step: value}}`` for each of ``keys`` from a run's ``metrics.jsonl`` in one read
    (last write wins; a key never logged maps to ``{}``)."""
    curves: dict[str, dict[int, float]] = {key: {} for key in keys}
    for line in Path(metrics_jsonl).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            for key, curve in curves.items():
                if key in record:
                    curve[int(record["step"])] = float(record[key])
    return curves


def read_curve(metrics_jsonl: Path, *, key: str = REWARD_KEY) -> dict[int, float]:
    """``{step: value}`` of one metric from a run's ``metrics.jsonl`` (:func:`read_curves`)."""
    return read_curves(metrics_jsonl, [key])[key]


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
