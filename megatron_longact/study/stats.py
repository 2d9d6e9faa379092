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
