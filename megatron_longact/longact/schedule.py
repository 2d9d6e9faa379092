"""When masks are recomputed, and the optional EMA of M across steps.

``dynamic`` (the paper): every step's mask comes from that step's batch.
``every_n_steps``: measure and reselect on steps 0, n, 2n, ...; keep the mask in between
(M is only measured on those steps, so the hooks cost nothing in between).
``static``: one mask for the whole run, from a saliency file written by profiling
(``longact saliency``); never measured during training.
"""

from __future__ import annotations

import torch

from megatron_longact.errors import UserError

SCHEDULES = ("dynamic", "every_n_steps", "static")


def refreshes_at(schedule: str, *, step: int, every_n_steps: int = 1) -> bool:
    """Whether the mask is recomputed at ``step`` (0-based optimizer steps)."""
    if schedule == "dynamic":
        return True
    if schedule == "every_n_steps":
        if every_n_steps < 1:
            raise UserError(f"longact.every_n_steps must be >= 1, got {every_n_steps}")
        return step % every_n_steps == 0
    if schedule == "static":
        return False
    raise UserError(f"longact.schedule must be one of {SCHEDULES}, got {schedule!r}")


def ema_update(
    previous: torch.Tensor | None, current: torch.Tensor, *, decay: float
) -> torch.Tensor:
    """``decay * previous + (1 - decay) * current``; ``current`` when there is no history or
    ``decay`` is 0 (no EMA)."""
    if previous is None or decay == 0.0:
        return current.clone()
    return previous.mul(decay).add_(current, alpha=1.0 - decay)
