"""Group-relative advantages (GRPO, paper Eq. 6) and their broadcast to response tokens.

For a prompt group of n responses with rewards s_1..s_n (verl's GRPO estimator):
    mu = mean(s), sigma = unbiased std(s) (divides by n - 1),
    A_i = (s_i - mu) / (sigma + eps)                      normalize_std=True (GRPO, DAPO)
    A_i = s_i - mu                                        normalize_std=False (Dr.GRPO)
A group of one has no baseline: mu = 0, sigma = 1, as in verl, so A = s / (1 + eps).
With ``leave_one_out`` (NeMo-RL's default) the baseline is the mean of the other n - 1 rewards,
and the division by (sigma + eps) happens only where sigma > 0.
"""

from __future__ import annotations

import torch

ADVANTAGE_EPS = 1e-6  # verl's epsilon in (s - mu) / (sigma + eps)


def _group_index(groups: torch.Tensor | int, num_items: int) -> torch.Tensor:
    """Maps ``groups`` (a group size or per-item group ids) to dense ids 0..G-1, shape [N]."""
    if isinstance(groups, int):
        if groups <= 0 or num_items % groups != 0:
            raise ValueError(
                f"group_size={groups} must be positive and divide the {num_items} rewards; "
                "pass per-response group ids for ragged groups"
            )
        return torch.arange(num_items) // groups
    ids = torch.as_tensor(groups)
    if ids.shape != (num_items,):
        raise ValueError(
            f"group ids have shape {tuple(ids.shape)}; expected ({num_items},), one per reward"
        )
    return torch.unique(ids, return_inverse=True)[1]


def group_advantages(
    rewards: torch.Tensor,
    groups: torch.Tensor | int,
    *,
    normalize_std: bool = True,
    leave_one_out: bool = False,
    eps: float = ADVANTAGE_EPS,
) -> torch.Tensor:
    """Computes one advantage per response from rewards within prompt groups.

    Args:
        rewards: [N] float, the sequence-level reward s_i of each response.
        groups: a group size g (responses of a prompt are contiguous, N divisible by g) or
            [N] integer group ids (any values; equal ids share a prompt).
        normalize_std: divide by (sigma + eps), sigma the unbiased group std (GRPO, DAPO);
            False gives Dr.GRPO's A = s - mu.
        leave_one_out: baseline = mean of the other responses of the group (RLOO / NeMo-RL);
            the division by (sigma + eps) then applies only where sigma > 0.
        eps: added to sigma.

    Returns:
        [N] advantages in the dtype of ``rewards`` (computed in float64 for exact group sums).
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N]; got shape {tuple(rewards.shape)}")
    num_items = rewards.shape[0]
    index = _group_index(groups, num_items).to(rewards.device)
    num_groups = int(index.max().item()) + 1 if num_items else 0
    scores = rewards.to(torch.float64)

    counts = torch.zeros(num_groups, dtype=torch.float64, device=rewards.device)
    counts.index_add_(0, index, torch.ones_like(scores))
    sums = torch.zeros_like(counts).index_add_(0, index, scores)
    mean = sums / counts
    sq_dev = (scores - mean[index]) ** 2
    var = torch.zeros_like(counts).index_add_(0, index, sq_dev) / (counts - 1).clamp(min=1)
    std = var.sqrt()

    n = counts[index]
    singleton = n == 1
    if leave_one_out:
        # Mean of the other n - 1 rewards; a group of one has no others, so baseline 0.
        baseline = torch.where(singleton, 0.0, (sums[index] - scores) / (n - 1).clamp(min=1))
    else:
        baseline = torch.where(singleton, 0.0, mean[index])
    centered = scores - baseline
    if not normalize_std:
        return centered.to(rewards.dtype)

    sigma = torch.where(singleton, 1.0, std[index])
    if leave_one_out:
        scaled = torch.where(sigma > 0, centered / (sigma + eps), centered)
    else:
        scaled = centered / (sigma + eps)
    return scaled.to(rewards.dtype)


def broadcast_to_tokens(advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Copies each response's advantage to its valid tokens.

    Args:
        advantages: [N] float, one per response.
        response_mask: [N, T] (bool or 0/1), 1 on the response tokens that get a loss.

    Returns:
        [N, T] in the dtype of ``advantages``: A_i on valid tokens, 0 elsewhere.
    """
    if advantages.dim() != 1 or response_mask.dim() != 2:
        raise ValueError(
            f"expected advantages [N] and response_mask [N, T]; got {tuple(advantages.shape)} "
            f"and {tuple(response_mask.shape)}"
        )
    if advantages.shape[0] != response_mask.shape[0]:
        raise ValueError(
            f"{advantages.shape[0]} advantages for {response_mask.shape[0]} responses; "
            "they must match one to one"
        )
    return advantages[:, None] * response_mask.to(advantages.dtype)
