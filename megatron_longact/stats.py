"""Statistics of sampled evaluation: mean@k with its standard error, unbiased pass@k, and the
seed of each sampled generate call (stdlib only; every layer may import it: ``longact eval``
and the RL loop's held-out evaluation report the same numbers the same way).
"""

from __future__ import annotations

from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct (``k <= n``).

    1 - C(n - c, k) / C(n, k), the estimator of Chen et al. 2021 ("Evaluating Large Language
    Models Trained on Code", Eq. 1), computed as their numerically stable product
    1 - prod_{i = n - c + 1}^{n} (1 - k / i) (the paper's Figure 3).
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass_ks(n: int) -> list[int]:
    """The k of the pass@k reported for ``n`` samples per prompt: 1, 2, 4, ... up to n, and n."""
    ks = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    return ks if ks[-1] == n else [*ks, n]


def mean_and_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error sd / sqrt(n) (sd with n - 1); NaNs are skipped.

    Applied to per-prompt means of k samples, the prompts are the independent units, so the
    error covers both the finite prompt set and the sampling (samples of one prompt are
    correlated, which a per-sample error would ignore). (nan, nan) when no value; SE nan for
    one value.
    """
    kept = [float(v) for v in values if v == v]
    if not kept:
        return float("nan"), float("nan")
    mean = sum(kept) / len(kept)
    if len(kept) < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in kept) / (len(kept) - 1)
    return mean, (var / len(kept)) ** 0.5


def call_seed(seed: int, first_index: int) -> int:
    """Seed of the generate call whose first prompt is sample ``first_index``: every call draws
    its own stream (one seed for all calls would give row r of every batch the same uniforms)."""
    return (seed * 1_000_003 + first_index) % (2**63 - 1)
