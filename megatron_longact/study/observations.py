"""Saliency statistics of a model (the paper's Figures 1, 3-5 and its premise, Sec. 3).

Pure functions on M [heads, D] (Eq. 2) and on :class:`SaliencyProfile` s:

- :func:`outlier_stats`: how peaked each head's row of M is (max / median) and how much of
  sum M and sum M^2 the top-λ dims of each head carry (uniform M would give λ for both);
- :func:`jaccard`: overlap of two selected sets (the stability of Eq. 9's choice);
- :func:`random_jaccard`: the overlap two independent uniform draws of k of D dims per head
  would have, the baseline a Jaccard is compared with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_longact.longact.profile import SaliencyProfile
from megatron_longact.longact.selection import num_selected, select_dims


@dataclass(frozen=True, kw_only=True)
class OutlierStats:
    """Outlier statistics of one projection of one layer (all heads together)."""

    max_over_median: float
    """Mean over heads of max_d M[h, d] / median_d M[h, d]."""
    max_over_median_worst: float
    """The largest per-head max / median."""
    share_sum: float
    """sum of M over the top-λ dims of each head / sum of M (λ for a flat M)."""
    share_sum_sq: float
    """The same for M^2."""


def outlier_stats(saliency_hd: torch.Tensor, *, ratio: float) -> OutlierStats:
    """:class:`OutlierStats` of M [heads, D] (float) with λ = ``ratio``."""
    m = saliency_hd.double()
    per_head = m.max(dim=1).values / m.median(dim=1).values.clamp_min(1e-30)
    top = select_dims(m, ratio=ratio, strategy="massive")
    return OutlierStats(
        max_over_median=float(per_head.mean()),
        max_over_median_worst=float(per_head.max()),
        share_sum=float(m[top].sum() / m.sum()),
        share_sum_sq=float(m[top].square().sum() / m.square().sum()),
    )


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """|A ∩ B| / |A ∪ B| of two bool masks of one shape (1.0 when both are empty)."""
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


def random_jaccard(*, ratio: float, head_dim: int) -> float:
    """Expected Jaccard of two independent uniform k-of-D draws per head, k = floor(λ D).

    Sums over the hypergeometric overlap i: P(i) * i / (2k - i) (exact, not the k^2/D
    approximation).
    """
    k, d = num_selected(ratio, head_dim), head_dim
    total = math.comb(d, k)
    return sum(
        math.comb(k, i) * math.comb(d - k, k - i) / total * i / (2 * k - i)
        for i in range(0, k + 1)
        if 2 * k - i > 0
    )


def profile_jaccard(
    a: SaliencyProfile, b: SaliencyProfile, *, ratio: float, projection: str
) -> list[float]:
    """Per-layer Jaccard of the ``massive`` selections of two profiles (same model shape)."""
    return [
        jaccard(
            select_dims(a.saliency[layer][projection], ratio=ratio),
            select_dims(b.saliency[layer][projection], ratio=ratio),
        )
        for layer in sorted(a.saliency)
    ]
