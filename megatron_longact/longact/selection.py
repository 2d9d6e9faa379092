"""Eq. 9: which dims of each head train, from a magnitude matrix M [heads, D].

``massive`` (the paper): the k = floor(lambda * D) largest entries of every head's row of M.
``min``: the k smallest (ablation). ``random``: k uniformly random dims per head from a seeded
generator, so every rank draws the same (ablation). ``none``: everything trains (dense).
``scope="global"`` ranks all heads x dims of a projection together and keeps
floor(lambda * heads * D) (ablation; heads may then get no dims at all).

Ties break towards the lower dim index (stable sort), so equal inputs give equal masks on
every rank.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

from megatron_longact.errors import UserError

STRATEGIES = ("massive", "min", "random", "none")
SCOPES = ("per_head", "global")
# lambda * D is computed in floating point: 0.29 * 100 = 28.999999999999996 should keep 29.
_FLOOR_SLACK = 1e-9


def num_selected(ratio: float, size: int) -> int:
    """k = floor(lambda * size), robust to float round-off; ValueError when it is 0."""
    if not 0 < ratio <= 1:
        raise UserError(f"longact.ratio (lambda) must lie in (0, 1], got {ratio}")
    k = math.floor(ratio * size + _FLOOR_SLACK)
    if k == 0:
        raise UserError(
            f"longact.ratio={ratio} keeps floor({ratio} x {size}) = 0 dims; raise the ratio to at "
            f"least {1 / size:.4g}"
        )
    return k


def random_generator(seed: int, *, step: int, layer: int, projection: str) -> torch.Generator:
    """A CPU generator whose stream depends only on (seed, step, layer, projection).

    Independent of the parallel layout: a pipeline stage draws its layers' masks without
    knowing the others.
    """
    index = "qkv".index(projection)
    state = np.random.SeedSequence([seed, step, layer, index]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _top_k_mask(scores: torch.Tensor, k: int, *, largest: bool) -> torch.Tensor:
    """Bool mask of the k largest (smallest) entries along the last dim; stable ties."""
    order = torch.sort(scores, dim=-1, descending=largest, stable=True).indices[..., :k]
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(-1, order, True)


def select_dims(
    saliency: torch.Tensor,
    *,
    ratio: float,
    strategy: Literal["massive", "min", "random", "none"] = "massive",
    scope: Literal["per_head", "global"] = "per_head",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Trainable (head, dim) pairs of one projection of one layer.

    Args:
        saliency: M [heads, D], any float dtype (unused for ``random`` and ``none``).
        ratio: lambda in (0, 1].
        strategy: see the module docstring.
        scope: ``per_head`` (Eq. 9) or ``global``.
        generator: CPU generator for ``random`` (see :func:`random_generator`).

    Returns:
        bool [heads, D] on ``saliency``'s device, True = the row trains.
    """
    if strategy not in STRATEGIES:
        raise UserError(f"longact.strategy must be one of {STRATEGIES}, got {strategy!r}")
    if scope not in SCOPES:
        raise UserError(f"longact.selection_scope must be one of {SCOPES}, got {scope!r}")
    if saliency.dim() != 2:
        raise ValueError(f"saliency must be [heads, D], got shape {tuple(saliency.shape)}")
    if strategy == "none":
        return torch.ones_like(saliency, dtype=torch.bool)
    if strategy == "random":
        if generator is None:
            raise ValueError("strategy 'random' needs a seeded generator")
        scores = torch.rand(saliency.shape, generator=generator).to(saliency.device)
    else:
        scores = saliency.float()
    largest = strategy != "min"
    if scope == "per_head":
        return _top_k_mask(scores, num_selected(ratio, scores.shape[1]), largest=largest)
    flat = _top_k_mask(scores.flatten(), num_selected(ratio, scores.numel()), largest=largest)
    return flat.view_as(scores)
