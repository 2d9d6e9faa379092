"""Rollout correction on hand-made tensors, the formulas written out (rl/correction.py), and
its application in the policy losses (rl/losses.py ``token_weights``)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_longact.config.schema import RLConfig
from megatron_longact.rl.correction import (
    ROLLOUT_WEIGHTS,
    apply_rollout_correction,
    correction_weights,
    sequence_mismatch,
    truncated_is_weights,
)
from megatron_longact.rl.losses import LOSS_FNS, dapo_loss, grpo_loss

# Two sequences as padded rows [2, 4]; response tokens where MASK is 1.
OLD = torch.tensor([[0.0, -1.0, -2.0, -0.5], [0.0, -0.3, -0.7, 0.0]])
ENGINE = torch.tensor([[0.0, -1.5, -1.0, -0.5], [0.0, -0.3, -0.2, 0.0]])
MASK = torch.tensor([[0.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
ROWS = torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]])


def test_truncated_is_weight_is_min_of_ratio_and_cap():
    weights = truncated_is_weights(OLD, ENGINE, cap=1.5)
    # pi_old / pi_engine = exp(old - engine): e^0.5 = 1.65 -> capped at 1.5; e^-1 = 0.368.
    expected = torch.tensor([[1.0, 1.5, math.exp(-1.0), 1.0], [1.0, 1.0, math.exp(-0.5), 1.0]])
    torch.testing.assert_close(weights, expected)
    huge = truncated_is_weights(torch.tensor([200.0]), torch.tensor([-200.0]), cap=2.0)
    assert huge.item() == pytest.approx(2.0)  # no overflow: exp(min(400, log 2))
    logp = torch.tensor([-1.0], requires_grad=True)
    assert not truncated_is_weights(logp, torch.tensor([-2.0]), cap=2.0).requires_grad


def test_sequence_mismatch_is_mean_abs_gap_over_response_tokens():
    gap = sequence_mismatch(OLD, ENGINE, MASK, ROWS, num_sequences=2)
    # row 0: |-1 + 1.5| + |-2 + 1| + |0| over 3 tokens; row 1: (0 + 0.5) / 2.
    torch.testing.assert_close(gap, torch.tensor([(0.5 + 1.0 + 0.0) / 3, 0.5 / 2]))
    # the same tokens packed as one stream with a sequence index give the same numbers
    packed = sequence_mismatch(OLD[MASK > 0], ENGINE[MASK > 0], MASK[MASK > 0],
                               ROWS[MASK > 0], num_sequences=2)  # fmt: skip
    torch.testing.assert_close(packed, gap)


def test_sequence_mask_zeroes_rollouts_over_threshold_and_counts():
    weights, stats = correction_weights(OLD, ENGINE, MASK, ROWS, num_sequences=2, is_cap=2.0,
                                        mask_threshold=0.4)  # fmt: skip
    # row 0's mismatch 0.5 > 0.4: masked; row 1 (0.25) keeps min(exp(old - engine), 2).
    expected = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 1.0, math.exp(-0.5), 0.0]])
    torch.testing.assert_close(weights, expected)
    assert stats.num_sequences == 2 and stats.num_masked == 1 and stats.num_tokens == 5
    metrics = stats.metrics()
    assert metrics["correction/masked_seq_frac"] == 0.5
    assert metrics["correction/weight_mean"] == pytest.approx((1 + math.exp(-0.5)) / 5)
    assert metrics["correction/weight_max"] == 1.0
    # importance sampling off: 1 on response tokens, masking still applies
    only_mask, _ = correction_weights(OLD, ENGINE, MASK, ROWS, num_sequences=2, is_cap=None,
                                      mask_threshold=0.4)  # fmt: skip
    torch.testing.assert_close(only_mask, torch.tensor([[0.0] * 4, [0.0, 1.0, 1.0, 0.0]]))
    _, capped = correction_weights(OLD, ENGINE, MASK, ROWS, num_sequences=2, is_cap=1.5,
                                   mask_threshold=None)  # fmt: skip
    assert capped.num_truncated == 1  # the one token at e^0.5 > 1.5


def test_apply_adds_weights_only_when_configured():
    batch = {"old_logp": OLD, "engine_logp": ENGINE, "response_mask": MASK}
    assert apply_rollout_correction([dict(batch)], rl=RLConfig()) == {}  # off by default
    micro = [dict(batch)]
    metrics = apply_rollout_correction(micro, rl=RLConfig(rollout_is=True, rollout_is_cap=1.5))
    torch.testing.assert_close(micro[0][ROLLOUT_WEIGHTS],
                               truncated_is_weights(OLD, ENGINE, cap=1.5) * MASK)  # fmt: skip
    assert metrics["correction/truncated_frac"] == pytest.approx(1 / 5)
    # Packed as rl.batch lays them out: one row [1, T], sequences told apart by sequence_ids
    # (-1 on a padding token, which has response_mask 0).
    pad = {"old_logp": 0.0, "engine_logp": 0.0, "response_mask": 0.0}
    packed = {k: torch.cat([v[MASK > 0], torch.tensor([pad[k]])])[None] for k, v in batch.items()}
    packed["sequence_ids"] = torch.cat([ROWS[MASK > 0], torch.tensor([-1])])[None]
    apply_rollout_correction([packed], rl=RLConfig(rollout_is=True, rollout_is_cap=1.5))
    torch.testing.assert_close(packed[ROLLOUT_WEIGHTS][0, :-1], micro[0][ROLLOUT_WEIGHTS][MASK > 0])
    assert packed[ROLLOUT_WEIGHTS][0, -1] == 0


@pytest.mark.parametrize("name", sorted(LOSS_FNS))
def test_losses_multiply_the_policy_gradient_term(name):
    gen = torch.Generator().manual_seed(0)
    logp = (OLD + 0.1 * torch.randn(OLD.shape, generator=gen)).requires_grad_()
    adv = torch.tensor([[0.0, 1.0, 1.0, 1.0], [0.0, -0.5, -0.5, 0.0]]) * MASK
    weights = torch.tensor([[0.0, 2.0, 0.5, 1.0], [0.0, 0.0, 1.5, 0.0]])
    options = {"generator": torch.Generator().manual_seed(1)} if name == "clip_cov" else {}
    if name == "clip_cov":
        options["clip_cov_ratio"] = 0.0  # no token dropped: compare the plain PG term
    if name == "kl_cov":
        options["kl_cov_ratio"] = 0.0
    fn = LOSS_FNS[name]
    counts = dict(num_global_tokens=1.0, num_global_sequences=1.0)
    if name == "grpo":
        options["kl_beta"] = 0.0
    plain, _ = fn(logp, OLD, adv, MASK, **counts, **options)
    weighted, _ = fn(logp, OLD, adv, MASK, token_weights=weights, **counts, **options)
    # token-weighting the loss equals weighting each token's term: compare against the sum of
    # per-token losses (each row alone, so seq-mean losses see their own counts) times w.
    per_token = torch.zeros_like(OLD)
    for b in range(2):
        for t in range(4):
            if MASK[b, t]:
                one = torch.zeros_like(MASK)
                one[b, t] = 1.0
                kw = {"sequence_token_counts": MASK.sum(1)} if name == "grpo" else {}
                options_t = dict(options)
                if name == "clip_cov":
                    options_t["generator"] = torch.Generator().manual_seed(1)
                per_token[b, t] = fn(logp, OLD, adv, one, **counts, **options_t, **kw)[0]
    torch.testing.assert_close(plain, per_token.sum(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weighted, (per_token * weights).sum(), rtol=1e-5, atol=1e-6)
    weighted.backward()
    assert logp.grad is not None and logp.grad[0, 1] != 0


def test_grpo_kl_term_is_not_weighted():
    logp = OLD.clone()
    ref = OLD - 0.2
    adv = torch.zeros_like(OLD)  # no PG term: only the KL remains
    zero = torch.zeros_like(OLD)
    args = dict(num_global_sequences=1.0, ref_logp=ref, kl_beta=0.1)
    base, _ = grpo_loss(logp, OLD, adv, MASK, **args)
    assert base > 0
    torch.testing.assert_close(grpo_loss(logp, OLD, adv, MASK, token_weights=zero, **args)[0],
                               base)  # fmt: skip
    assert dapo_loss(logp, OLD, adv + 1.0, MASK, num_global_tokens=1.0,
                     token_weights=zero)[0].item() == 0.0  # fmt: skip


def test_config_rejects_bad_correction_fields():
    with pytest.raises(ValueError, match="rollout_is_cap"):
        RLConfig(rollout_is_cap=0.5)
    with pytest.raises(ValueError, match="rollout_mask_threshold"):
        RLConfig(rollout_mask_threshold=0.0)
