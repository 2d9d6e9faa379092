"""Mean and 95% confidence interval per arm over seeds (Student's t, two-sided)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# t_{0.975, dof} for dof = 1..30 (standard tables); larger dof use the normal 1.96.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
_Z975 = 1.96


def t_quantile_975(dof: int) -> float:
    """Two-sided 95% critical value of Student's t with ``dof`` degrees of freedom."""
    if dof < 1:
        raise ValueError(f"a confidence interval needs at least 2 values (dof={dof})")
    return _T975[dof - 1] if dof <= len(_T975) else _Z975


@dataclass(frozen=True, kw_only=True)
class ArmSummary:
    """One arm over its seeds."""

    arm: str
    n: int
    mean: float
    ci95: float
    """Half-width of the 95% interval: t * sd / sqrt(n) (sd with n - 1); nan for one seed."""
    values: tuple[float, ...]


def summarize(values: Sequence[float], *, arm: str) -> ArmSummary:
    """Mean and 95% CI half-width of ``values`` (one per seed)."""
    if not values:
        raise ValueError(f"arm {arm!r} has no finished runs to summarize")
    n = len(values)
    mean = statistics.fmean(values)
    ci = math.nan if n < 2 else t_quantile_975(n - 1) * statistics.stdev(values) / math.sqrt(n)
    return ArmSummary(arm=arm, n=n, mean=mean, ci95=ci, values=tuple(values))


def summarize_arms(values_by_arm: Mapping[str, Sequence[float]]) -> list[ArmSummary]:
    """:func:`summarize` for every arm, in the mapping's order."""
    return [summarize(values, arm=arm) for arm, values in values_by_arm.items()]


def mean_curve(curves: Sequence[Mapping[int, float]]) -> dict[int, tuple[float, float]]:
    """Per step: (mean, 95% CI half-width) over the curves holding that step (nan for one)."""
    steps = sorted({s for c in curves for s in c})
    out = {}
    for step in steps:
        summary = summarize([c[step] for c in curves if step in c], arm=f"step {step}")
        out[step] = (summary.mean, summary.ci95)
    return out


def format_table(summaries: Sequence[ArmSummary], *, metric: str, scale: float = 100.0) -> str:
    """Markdown: arm | seeds | mean ± 95% CI | per-seed values (``scale`` 100: percent)."""
    lines = [f"| arm | seeds | {metric} (mean ± 95% CI) | per seed |", "|---|---|---|---|"]
    for s in summaries:
        ci = "n/a" if math.isnan(s.ci95) else f"{scale * s.ci95:.1f}"
        seeds = ", ".join(f"{scale * v:.1f}" for v in s.values)
        lines.append(f"| {s.arm} | {s.n} | {scale * s.mean:.1f} ± {ci} | {seeds} |")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, kw_only=True)
class SeedArmSplit:
    """Two-way split of final values over a complete arms x seeds grid (one run per cell):
    how much of the spread the arm explains, how much the seed (prompt order and rollout
    draws, shared by every arm of a seed), and what is left."""

    arms: int
    seeds: int
    share_arm: float
    """Fraction of the total sum of squares explained by the arm means."""
    share_seed: float
    share_residual: float
    f_arm: float
    """Mean square of the arms over the residual mean square (dof arms-1, (arms-1)(seeds-1))."""
    f_seed: float
    residual_sd: float
    """sqrt(residual mean square): one run's noise once its arm and seed are accounted for."""

    def seeds_for(self, half_width: float) -> int:
        """Seeds per arm for a 95% CI of ``half_width`` on an arm-minus-arm difference paired by
        seed (that difference's sd is sqrt(2) * residual_sd; normal approximation)."""
        return math.ceil((_Z975 * math.sqrt(2) * self.residual_sd / half_width) ** 2)


def seed_arm_split(grid: Sequence[Sequence[float]]) -> SeedArmSplit:
    """Additive two-way analysis of variance without replication. ``grid[a][s]``: the value of
    arm ``a`` at seed ``s`` (every cell filled; at least 2 arms and 2 seeds)."""
    arms, seeds = len(grid), len(grid[0]) if grid else 0
    if arms < 2 or seeds < 2 or any(len(row) != seeds for row in grid):
        raise ValueError(f"seed_arm_split needs a full grid of >= 2 arms x >= 2 seeds, got "
                         f"{[len(row) for row in grid]}")  # fmt: skip
    grand = statistics.fmean(v for row in grid for v in row)
    arm_means = [statistics.fmean(row) for row in grid]
    seed_means = [statistics.fmean(row[s] for row in grid) for s in range(seeds)]
    ss_total = sum((v - grand) ** 2 for row in grid for v in row)
    ss_arm = seeds * sum((m - grand) ** 2 for m in arm_means)
    ss_seed = arms * sum((m - grand) ** 2 for m in seed_means)
    ss_res = max(ss_total - ss_arm - ss_seed, 0.0)
    ms_res = ss_res / ((arms - 1) * (seeds - 1))

    def f(ss: float, dof: int) -> float:
        return ss / dof / ms_res if ms_res > 0 else math.inf

    total = ss_total or 1.0
    return SeedArmSplit(
        arms=arms, seeds=seeds, share_arm=ss_arm / total, share_seed=ss_seed / total,
        share_residual=ss_res / total, f_arm=f(ss_arm, arms - 1), f_seed=f(ss_seed, seeds - 1),
        residual_sd=math.sqrt(ms_res),
    )  # fmt: skip
