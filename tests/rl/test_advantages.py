"""Group advantages against hand-computed values."""

import math
import statistics

import pytest
import torch

from megatron_longact.rl.advantages import ADVANTAGE_EPS, group_advantages

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


def _nemo_rl_loo(rewards: list[float], eps: float = EPS) -> list[float]:
    """NeMo-RL's GRPO leave-one-out advantage written out per response (NVIDIA-NeMo/RL
    nemo_rl/algorithms/utils.py:104-197 and advantage_estimator.py:84-96 at 7ea279a): mean
    and unbiased std of the other n - 1 rewards; no division where that std is 0 (n = 2 or
    equal others); a group of one gets 0."""
    if len(rewards) == 1:
        return [0.0]
    out = []
    for i, s in enumerate(rewards):
        others = rewards[:i] + rewards[i + 1 :]
        centered = s - statistics.mean(others)
        std = statistics.stdev(others) if len(others) > 1 else 0.0
        out.append(centered / (std + eps) if std > 0 else centered)
    return out


def test_leave_one_out_matches_nemo_rl():
    # The case: NeMo-RL gives [1, -0.577, -0.577, -0.577].
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    loo = group_advantages(rewards, 4, leave_one_out=True)
    _close(loo, _nemo_rl_loo([1.0, 0.0, 0.0, 0.0]))
    third = 1 / math.sqrt(3)  # others [1, 0, 0]: mean 1/3, unbiased std sqrt(1/3)
    _close(loo, [1.0, -(1 / 3) / (third + EPS), -(1 / 3) / (third + EPS), -(1 / 3) / (third + EPS)])
    assert loo[1].item() == pytest.approx(-0.57735, abs=1e-5)
    # Unscaled: s_i - mean of the others.
    _close(group_advantages(rewards, 4, leave_one_out=True, normalize_std=False),
           [1.0, -1 / 3, -1 / 3, -1 / 3])  # fmt: skip
    # n = 2: one other reward, std 0, so no division.
    _close(group_advantages(torch.tensor([1.0, 0.0]), 2, leave_one_out=True), [1.0, -1.0])
    # All equal: 0 everywhere (no 0/eps blow-up).
    _close(group_advantages(torch.full((3,), 0.1), 3, leave_one_out=True), [0.0, 0.0, 0.0])


def test_leave_one_out_random_groups_match_nemo_rl():
    gen = torch.Generator().manual_seed(0)
    sizes = [1, 2, 3, 5, 8, 16]
    rewards = torch.cat([torch.randint(0, 3, (n,), generator=gen).double() for n in sizes])
    rewards[-16:] += torch.rand(16, generator=gen, dtype=torch.float64)  # non-integer rewards
    ids = torch.cat([torch.full((n,), g) for g, n in enumerate(sizes)])
    got = group_advantages(rewards, ids, leave_one_out=True)
    expected, start = [], 0
    for n in sizes:
        expected += _nemo_rl_loo(rewards[start : start + n].tolist())
        start += n
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


def test_group_of_one_like_verl():
    # mu = 0, sigma = 1: A = s / (1 + eps); Dr.GRPO: A = s.
    _close(group_advantages(torch.tensor([0.7, -2.0]), 1), [0.7 / (1 + EPS), -2.0 / (1 + EPS)])
    _close(group_advantages(torch.tensor([0.7]), 1, normalize_std=False), [0.7])
    # NeMo-RL's leave-one-out: a group of one has no other reward, advantage 0.
    _close(group_advantages(torch.tensor([0.7]), 1, leave_one_out=True), [0.0])


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
