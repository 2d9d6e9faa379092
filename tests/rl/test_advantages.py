"""Group advantages against hand-computed values."""

import math

import pytest
import torch

from megatron_longact.rl.advantages import ADVANTAGE_EPS, broadcast_to_tokens, group_advantages

EPS = ADVANTAGE_EPS


def _close(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype))


def test_grpo_two_groups():
    # Group [2, 1, 0]: mu = 1, unbiased var = (1 + 0 + 1) / 2 = 1, sigma = 1
    #   -> A = (1, 0, -1) / (1 + eps).
    # Group [1, 1, 1]: all equal -> sigma = 0, A = 0 / eps = 0.
    rewards = torch.tensor([2.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    adv = group_advantages(rewards, 3)
    d = 1 + EPS
    _close(adv, [1 / d, 0.0, -1 / d, 0.0, 0.0, 0.0])
    assert adv.dtype == torch.float32


def test_grpo_one_correct_of_four():
    # [1, 0, 0, 0]: mu = 0.25; squared deviations 0.5625 + 3 * 0.0625 = 0.75;
    # unbiased var = 0.75 / 3 = 0.25, sigma = 0.5.
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4)
    d = 0.5 + EPS
    _close(adv, [0.75 / d, -0.25 / d, -0.25 / d, -0.25 / d])


def test_dr_grpo_no_std():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4, normalize_std=False)
    _close(adv, [0.75, -0.25, -0.25, -0.25])


def test_leave_one_out():
    # Baselines: i=0 -> mean(0, 0, 0) = 0; i>0 -> mean(1, 0, 0) = 1/3.
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    loo = group_advantages(rewards, 4, leave_one_out=True, normalize_std=False)
    _close(loo, [1.0, -1 / 3, -1 / 3, -1 / 3])
    # sigma = 0.5 > 0 (whole group, unbiased) -> divided by 0.5 + eps.
    loo_std = group_advantages(rewards, 4, leave_one_out=True)
    d = 0.5 + EPS
    _close(loo_std, [1 / d, -1 / 3 / d, -1 / 3 / d, -1 / 3 / d])
    # All equal: no division (sigma = 0), and every centered value is 0.
    _close(group_advantages(torch.ones(3), 3, leave_one_out=True), [0.0, 0.0, 0.0])


def test_group_of_one_like_verl():
    # mu = 0, sigma = 1: A = s / (1 + eps); Dr.GRPO: A = s.
    _close(group_advantages(torch.tensor([0.7, -2.0]), 1), [0.7 / (1 + EPS), -2.0 / (1 + EPS)])
    _close(group_advantages(torch.tensor([0.7]), 1, normalize_std=False), [0.7])
    _close(group_advantages(torch.tensor([0.7]), 1, leave_one_out=True), [0.7 / (1 + EPS)])


def test_ragged_group_ids():
    # ids 5, 5, 9: group 5 = [1, 3]: mu = 2, sigma = sqrt(2 / 1); group 9 is a singleton.
    rewards = torch.tensor([1.0, 3.0, 4.0], dtype=torch.float64)
    adv = group_advantages(rewards, torch.tensor([5, 5, 9]))
    s = math.sqrt(2) + EPS
    _close(adv, [-1 / s, 1 / s, 4 / (1 + EPS)])
    # Ids need not be contiguous: interleaving gives the same per-response values.
    adv2 = group_advantages(rewards[[0, 2, 1]], torch.tensor([5, 9, 5]))
    _close(adv2, [-1 / s, 4 / (1 + EPS), 1 / s])


def test_bad_groups():
    with pytest.raises(ValueError, match="divide"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="one per reward"):
        group_advantages(torch.zeros(4), torch.tensor([0, 0, 1]))


def test_broadcast_to_tokens():
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]], dtype=torch.bool)
    _close(broadcast_to_tokens(adv, mask), [[2.0, 2.0, 0.0], [0.0, -1.0, -1.0]])
    with pytest.raises(ValueError, match="one to one"):
        broadcast_to_tokens(adv, torch.ones(3, 2))
