"""DAPO dynamic sampling accounting and overlong reward shaping.

Dynamic sampling (Yu et al. 2025; verl's DAPO recipe): a prompt group whose N responses all
got the same filter metric (all right or all wrong) has zero advantage everywhere and teaches
nothing, so it is dropped. Kept groups accumulate over generation batches until the train batch
holds ``train_batch_size`` groups; the surplus of the last generation batch is discarded.

Overlong shaping: responses that run into the last ``buffer_length`` tokens before
``max_response_length`` get a linear penalty from 0 down to -penalty_factor; overlong
filtering instead gives truncated responses zero loss weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from megatron_longact.errors import UserError

MAX_NUM_GEN_BATCHES = 10  # verl's DAPO scripts; <= 0 means unbounded
OVERLONG_PENALTY_FACTOR = 1.0  # verl's DAPO 32B script (buffer 4096 with max length 20480)


def filter_groups(metric: torch.Tensor | Sequence[float], group_size: int) -> torch.Tensor:
    """Which prompt groups dynamic sampling keeps.

    Args:
        metric: [N] float, the filter metric per response (accuracy or reward), responses of a
            prompt contiguous.
        group_size: responses per prompt; must divide N.

    Returns:
        [N // group_size] bool: True where the group's metric has std > 0, or the group has a
        single response. "std > 0" is tested as max != min, which is exact where a float std
        of equal values can come out as a tiny positive number.
    """
    values = torch.as_tensor(metric, dtype=torch.float64)
    if values.dim() != 1:
        raise ValueError(f"metric must be 1-D [N]; got shape {tuple(values.shape)}")
    if group_size <= 0 or values.numel() % group_size != 0:
        raise ValueError(
            f"group_size={group_size} must be positive and divide the {values.numel()} metric "
            "values (responses per prompt, contiguous)"
        )
    grouped = values.view(-1, group_size)
    if group_size == 1:
        return torch.ones(grouped.shape[0], dtype=torch.bool)
    return grouped.amax(dim=1) != grouped.amin(dim=1)


@dataclass(kw_only=True)
class DynamicSamplingState:
    """Kept prompt groups gathered across generation batches for one training step.

    Attributes:
        train_batch_size: prompt groups a training step needs.
        max_num_gen_batches: generation batches allowed per step; <= 0 means unbounded.
        on_exhausted: when the limit is hit with too few groups, "error" raises RuntimeError,
            "continue" trains on the groups gathered so far.
        kept: the kept groups so far (any per-group payload, in arrival order).
        num_gen_batches: generation batches used for the current step.
        num_groups_seen: groups generated for the current step, kept or not.
        exhausted: set when the limit was hit under on_exhausted="continue".
    """

    train_batch_size: int
    max_num_gen_batches: int = MAX_NUM_GEN_BATCHES
    on_exhausted: Literal["error", "continue"] = "error"
    kept: list[Any] = field(default_factory=list)
    num_gen_batches: int = 0
    num_groups_seen: int = 0
    exhausted: bool = False

    def __post_init__(self) -> None:
        if self.train_batch_size <= 0:
            raise ValueError(f"train_batch_size={self.train_batch_size} must be positive")
        if self.on_exhausted not in ("error", "continue"):
            raise UserError(f"on_exhausted={self.on_exhausted!r}; use 'error' or 'continue'")


def add_generation_batch(
    state: DynamicSamplingState,
    groups: Sequence[Any],
    keep: torch.Tensor | Sequence[bool],
) -> bool:
    """Adds one generation batch's groups, keeping those ``keep`` marks; True when ready.

    Ready means ``state.kept`` holds at least ``train_batch_size`` groups, or the generation
    limit was hit under ``on_exhausted="continue"``. Call ``pop_train_batch`` when ready.

    Raises:
        RuntimeError: the limit ``max_num_gen_batches`` was reached with too few kept groups
            and ``on_exhausted="error"``.
    """
    keep_list = [bool(k) for k in (keep.tolist() if isinstance(keep, torch.Tensor) else keep)]
    if len(keep_list) != len(groups):
        raise ValueError(f"{len(keep_list)} keep flags for {len(groups)} groups; give one each")
    state.num_gen_batches += 1
    state.num_groups_seen += len(groups)
    state.kept.extend(g for g, k in zip(groups, keep_list, strict=True) if k)
    if len(state.kept) >= state.train_batch_size:
        return True
    limited = state.max_num_gen_batches > 0
    if limited and state.num_gen_batches >= state.max_num_gen_batches:
        if state.on_exhausted == "error":
            raise RuntimeError(
                f"dynamic sampling kept {len(state.kept)} of {state.train_batch_size} prompt "
                f"groups after {state.num_gen_batches} generation batches "
                f"({state.num_groups_seen} groups seen): too many groups had identical "
                "rewards. Raise max_num_gen_batches (<= 0 is unbounded), enlarge the "
                "generation batch, use harder/easier data, or set on_exhausted='continue'"
            )
        state.exhausted = True
        return True
    return False


def pop_train_batch(state: DynamicSamplingState) -> list[Any]:
    """Returns exactly ``train_batch_size`` kept groups (fewer only after exhaustion under
    "continue") in arrival order, drops the surplus and resets the state for the next step."""
    batch = state.kept[: state.train_batch_size]
    state.kept = []
    state.num_gen_batches = 0
    state.num_groups_seen = 0
    state.exhausted = False
    return batch


def overlong_penalty(
    response_lengths: torch.Tensor,
    *,
    max_response_length: int,
    buffer_length: int,
    penalty_factor: float = OVERLONG_PENALTY_FACTOR,
) -> torch.Tensor:
    """DAPO's soft overlong punishment, added to the reward.

    exceed = |y| - (L_max - L_buf);  penalty = min(-exceed / L_buf * penalty_factor, 0):
    0 up to L_max - L_buf tokens, then linear down to -penalty_factor at |y| = L_max.

    Args:
        response_lengths: [N] int, response lengths in tokens.
        max_response_length: L_max, the generation limit.
        buffer_length: L_buf, the width of the penalty ramp (0 < L_buf <= L_max).
        penalty_factor: the penalty at L_max.

    Returns:
        [N] float32 penalties (<= 0).
    """
    if not 0 < buffer_length <= max_response_length:
        raise UserError(
            f"overlong buffer_length={buffer_length} must be in (0, max_response_length="
            f"{max_response_length}]"
        )
    lengths = torch.as_tensor(response_lengths).to(torch.float32)
    exceed = lengths - (max_response_length - buffer_length)
    return torch.clamp(-exceed / buffer_length * penalty_factor, max=0.0)


def truncated_responses(
    response_lengths: torch.Tensor,
    *,
    max_response_length: int,
    eos_emitted: torch.Tensor | None = None,
) -> torch.Tensor:
    """[N] bool: responses cut off by the length limit (length >= L_max and, when
    ``eos_emitted`` [N] bool is given, no end-of-sequence token)."""
    truncated = torch.as_tensor(response_lengths) >= max_response_length
    if eos_emitted is not None:
        truncated = truncated & ~torch.as_tensor(eos_emitted, dtype=torch.bool)
    return truncated


def overlong_filter_mask(response_mask: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """Overlong filtering: zeroes the loss mask [N, T] of truncated responses ([N] bool).

    Apply it before counting ``num_global_tokens`` so filtered tokens leave the denominator.
    """
    if truncated.shape != response_mask.shape[:1]:
        raise ValueError(
            f"truncated has shape {tuple(truncated.shape)}; expected ({response_mask.shape[0]},)"
        )
    keep = (~truncated.bool()).to(response_mask.dtype)
    return response_mask * keep[:, None]
