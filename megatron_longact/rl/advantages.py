"""Group-relative advantages (GRPO, paper Eq. 6) and their broadcast to response tokens.

For a prompt group of n responses with rewards s_1..s_n (verl's GRPO estimator):
    mu = mean(s), sigma = unbiased std(s) (divides by n - 1),
    A_i = (s_i - mu) / (sigma + eps)                      normalize_std=True (GRPO, DAPO)
    A_i = s_i - mu                                        normalize_std=False (Dr.GRPO)
A group of one has no baseline: mu = 0, sigma = 1, as in verl, so A = s / (1 + eps).

``leave_one_out`` is NeMo-RL's GRPO estimator exactly (``nemo_rl/algorithms/utils.py:104``
``calculate_baseline_and_std_per_prompt`` with ``leave_one_out_baseline=True``, and
``advantage_estimator.py:57`` ``GRPOAdvantageEstimator``, NVIDIA-NeMo/RL at 7ea279a): both the
baseline and sigma come from the other n - 1 rewards of the group,
    mu_-i = mean(s_j, j != i), sigma_-i = unbiased std(s_j, j != i) (divides by n - 2),
    A_i = (s_i - mu_-i) / (sigma_-i + eps)  where sigma_-i > 0, else s_i - mu_-i.
A group of two has one other reward, so sigma_-i = 0 and A is left unscaled (NeMo-RL's
``nan_to_num(0)`` at utils.py:195); a group of one gets A = 0 (utils.py:156 sets the baseline
to the reward itself). Input [1, 0, 0, 0] gives [1, -0.577, -0.577, -0.577].
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
        leave_one_out: NeMo-RL's estimator (module docstring): baseline and sigma from the
            other n - 1 responses of the group, division only where that sigma > 0.
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
    if leave_one_out:
        return _leave_one_out(scores, index, n=n, mean=mean, counts=counts,
                              normalize_std=normalize_std, eps=eps).to(rewards.dtype)  # fmt: skip
    singleton = n == 1
    centered = scores - torch.where(singleton, 0.0, mean[index])
    if not normalize_std:
        return centered.to(rewards.dtype)
    sigma = torch.where(singleton, 1.0, std[index])
    return (centered / (sigma + eps)).to(rewards.dtype)


def _leave_one_out(
    scores: torch.Tensor,
    index: torch.Tensor,
    *,
    n: torch.Tensor,
    mean: torch.Tensor,
    counts: torch.Tensor,
    normalize_std: bool,
    eps: float,
) -> torch.Tensor:
    """NeMo-RL's leave-one-out advantages, [N] float64 (see the module docstring).

    With d_j = s_j - mu (group mean) and D = sum_j d_j^2, the others of i have mean
    mu_-i = mu - d_i / (n - 1) and squared deviations sum_(j != i) (s_j - mu_-i)^2 =
    D - d_i^2 - d_i^2 / (n - 1): centred sums, no cancellation when all rewards are equal.
    """
    others = (n - 1).clamp(min=1)
    dev = scores - mean[index]
    centered = torch.where(n > 1, dev + dev / others, 0.0)  # s_i - mu_-i = d_i * n / (n - 1)
    if not normalize_std:
        return centered
    sq_sum = torch.zeros_like(counts).index_add_(0, index, dev**2)[index]
    others_sq = (sq_sum - dev**2 - dev**2 / others).clamp(min=0)
    sigma = torch.where(n > 2, (others_sq / (n - 2).clamp(min=1)).sqrt(), 0.0)
    return torch.where(sigma > 0, centered / (sigma + eps), centered)
