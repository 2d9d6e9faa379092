"""Policy losses against hand-computed values, and the global-batch normalization contract."""

import functools
import math

import pytest
import torch

from megatron_longact.rl.losses import (
    LOSS_FNS,
    clip_cov_loss,
    dapo_loss,
    get_loss_fn,
    grpo_loss,
    kl_cov_loss,
    masked_mean,
)

F64 = torch.float64


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def _logp_from_ratios(ratios, old_logp):
    """logp (a leaf with grad) such that exp(logp - old_logp) = ratios."""
    return (old_logp + torch.log(_t(ratios))).detach().requires_grad_(True)


# Shared tiny batch: 2 sequences x 3 tokens, the last token of row 1 is padding.
#   row 0: A = +1, r = [1.0, 1.5, 0.5]
#   row 1: A = -1, r = [1.1, 0.5, 9.0 (padding)]
OLD = _t([[-1.0, -2.0, -0.5], [-0.3, -1.2, -2.0]])
RATIOS = [[1.0, 1.5, 0.5], [1.1, 0.5, 9.0]]
ADV = _t([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)


# ------------------------------------------------------------------------------------- helpers


def test_masked_mean():
    values = _t([[1.0, 2.0], [3.0, 4.0]])
    mask = torch.tensor([[1, 0], [1, 1]])
    assert masked_mean(values, mask).item() == pytest.approx(8 / 3)  # (1 + 3 + 4) / 3
    torch.testing.assert_close(masked_mean(values, mask, dim=-1), _t([1.0, 3.5]))
    assert masked_mean(values, torch.zeros(2, 2)).item() == 0.0  # empty mask -> 0, not nan


# ---------------------------------------------------------------------------------------- DAPO


def test_dapo_hand_computed_values_and_grads():
    # eps_low 0.2, eps_high 0.28, per token max(-A r, -A clip(r, 0.8, 1.28)):
    #   row 0 (A=+1): r=1.0 -> -1;  r=1.5 -> max(-1.5, -1.28) = -1.28 (clipped high);
    #                 r=0.5 -> max(-0.5, -0.8) = -0.5
    #   row 1 (A=-1): r=1.1 -> 1.1; r=0.5 -> max(0.5, 0.8) = 0.8 (clipped low, < cap 3)
    # sum = -1 - 1.28 - 0.5 + 1.1 + 0.8 = -0.88; 5 valid tokens -> -0.176.
    logp = _logp_from_ratios(RATIOS, OLD)
    loss, metrics = dapo_loss(logp, OLD, ADV, MASK, num_global_tokens=5)
    assert loss.item() == pytest.approx(-0.176)
    assert metrics["clip_frac_high"].item() == pytest.approx(0.2)
    assert metrics["clip_frac_low"].item() == pytest.approx(0.2)
    assert metrics["dual_clip_frac"].item() == 0.0
    assert metrics["ratio_mean"].item() == pytest.approx((1.0 + 1.5 + 0.5 + 1.1 + 0.5) / 5)
    approx_kl = -(0 + math.log(1.5) + math.log(0.5) + math.log(1.1) + math.log(0.5)) / 5
    assert metrics["approx_kl"].item() == pytest.approx(approx_kl)
    # d/dlogp of -A r / N is -A r / N where unclipped; 0 where clipped or padded.
    loss.backward()
    torch.testing.assert_close(logp.grad, _t([[-0.2, 0.0, -0.1], [0.22, 0.0, 0.0]]))


def test_clip_higher_is_asymmetric():
    # A = +1, r = 1.25: inside 1 + 0.28 (loss -1.25), outside 1 + 0.2 (loss -1.2).
    old = _t([[0.0]])
    adv, mask = _t([[1.0]]), torch.ones(1, 1)
    logp = _logp_from_ratios([[1.25]], old)
    dapo, m_dapo = dapo_loss(logp, old, adv, mask, num_global_tokens=1)
    sym, m_sym = dapo_loss(logp, old, adv, mask, num_global_tokens=1, eps_high=0.2)
    assert dapo.item() == pytest.approx(-1.25)
    assert sym.item() == pytest.approx(-1.2)
    assert (m_dapo["clip_frac_high"].item(), m_sym["clip_frac_high"].item()) == (0.0, 1.0)
    # A = -1, r = 0.75: 0.75 < 1 - 0.2 -> clipped low to 0.8 with either eps_high.
    logp = _logp_from_ratios([[0.75]], old)
    low, m_low = dapo_loss(logp, old, -adv, mask, num_global_tokens=1)
    assert low.item() == pytest.approx(0.8)
    assert m_low["clip_frac_low"].item() == 1.0


def test_dual_clip():
    # A = -2, r = 4: -A r = 8, -A clip(r) = 2 * 1.28 = 2.56, max = 8; cap -A c = 6 -> 6.
    old, mask = _t([[0.0]]), torch.ones(1, 1)
    logp = _logp_from_ratios([[4.0]], old)
    loss, metrics = dapo_loss(logp, old, _t([[-2.0]]), mask, num_global_tokens=1)
    assert loss.item() == pytest.approx(6.0)
    assert metrics["dual_clip_frac"].item() == 1.0
    loss.backward()
    assert logp.grad.item() == 0.0  # the cap is constant in logp
    # Disabled: the unbounded 8; c = 10 (verl's default) does not bind either.
    off, _ = dapo_loss(logp, old, _t([[-2.0]]), mask, num_global_tokens=1, dual_clip_c=None)
    assert off.item() == pytest.approx(8.0)
    c10, _ = dapo_loss(logp, old, _t([[-2.0]]), mask, num_global_tokens=1, dual_clip_c=10.0)
    assert c10.item() == pytest.approx(8.0)
    # A > 0 is never dual-clipped: r = 4, A = 2 -> max(-8, -2.56) = -2.56.
    pos, _ = dapo_loss(logp, old, _t([[2.0]]), mask, num_global_tokens=1)
    assert pos.item() == pytest.approx(-2.56)
    with pytest.raises(ValueError, match="must be > 1"):
        dapo_loss(logp, old, _t([[-2.0]]), mask, num_global_tokens=1, dual_clip_c=1.0)


def test_log_ratio_clamp():
    # logp - old = 50 is clamped to 20 before exp: A = +1 -> loss = max(-e^20, -1.28) = -1.28,
    # and with A = -1 the ratio is e^20 (finite), dual-capped at 3.
    old, mask = _t([[0.0]]), torch.ones(1, 1)
    logp = _t([[50.0]]).requires_grad_(True)
    loss, metrics = dapo_loss(logp, old, _t([[-1.0]]), mask, num_global_tokens=1)
    assert loss.item() == pytest.approx(3.0)
    assert metrics["ratio_mean"].item() == pytest.approx(math.exp(20))


def test_dapo_all_padding_and_zero_advantage():
    # All-equal rewards give A = 0: the loss and its gradient vanish.
    logp = _logp_from_ratios(RATIOS, OLD)
    loss, _ = dapo_loss(logp, OLD, torch.zeros_like(ADV), MASK, num_global_tokens=5)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(logp.grad) == 0
    # An all-padding micro-batch contributes exactly 0 (the global count is elsewhere).
    empty, metrics = dapo_loss(logp, OLD, ADV, torch.zeros_like(MASK), num_global_tokens=5)
    assert empty.item() == 0.0 and metrics["ratio_mean"].item() == 0.0


def test_missing_count_and_shape_errors():
    logp = _logp_from_ratios(RATIOS, OLD)
    with pytest.raises(ValueError, match="num_global_tokens"):
        dapo_loss(logp, OLD, ADV, MASK)
    with pytest.raises(ValueError, match="num_global_sequences"):
        grpo_loss(logp, OLD, ADV, MASK, num_global_tokens=5, kl_beta=0.0)
    with pytest.raises(ValueError, match="mask has shape"):
        dapo_loss(logp, OLD, ADV, MASK[:, :2], num_global_tokens=5)


# ---------------------------------------------------------------------------------------- GRPO


def test_grpo_seq_mean_token_mean():
    # eps 0.2 both sides (paper Eq. 5):
    #   row 0 (A=+1): -1, max(-1.5, -1.2) = -1.2, -0.5 -> mean -2.7 / 3 = -0.9
    #   row 1 (A=-1): 1.1, max(0.5, 0.8) = 0.8 -> mean 1.9 / 2 = 0.95
    # (-0.9 + 0.95) / 2 sequences = 0.025
    logp = _logp_from_ratios(RATIOS, OLD)
    loss, metrics = grpo_loss(logp, OLD, ADV, MASK, num_global_sequences=2, kl_beta=0.0)
    assert loss.item() == pytest.approx(0.025)
    assert "kl" not in metrics
    # Grad: row 0 tokens 0 and 2 unclipped -> -A r / (3 * 2); row 1 token 0 -> -A r / (2 * 2).
    loss.backward()
    torch.testing.assert_close(logp.grad, _t([[-1 / 6, 0.0, -0.5 / 6], [1.1 / 4, 0.0, 0.0]]))


def test_grpo_k3_kl():
    # ref = logp except row 0 token 0 where ref - logp = ln 2: k3 = 2 - ln 2 - 1 = 1 - ln 2.
    # beta 0.1 adds 0.1 (1 - ln 2) / 3 tokens / 2 sequences to 0.025.
    logp = _logp_from_ratios(RATIOS, OLD)
    ref = logp.detach().clone()
    ref[0, 0] += math.log(2)
    loss, metrics = grpo_loss(
        logp, OLD, ADV, MASK, num_global_sequences=2, ref_logp=ref, kl_beta=0.1
    )
    assert loss.item() == pytest.approx(0.025 + 0.1 * (1 - math.log(2)) / 3 / 2)
    assert metrics["kl"].item() == pytest.approx((1 - math.log(2)) / 5)
    # Clamped as verl: ref - logp = 30 -> 20 inside exp, then k3 clamped to 10.
    far = logp.detach().clone()
    far[0, 0] += 30
    _, far_metrics = grpo_loss(
        logp, OLD, ADV, MASK, num_global_sequences=2, ref_logp=far, kl_beta=0.1
    )
    assert far_metrics["kl"].item() == pytest.approx(10 / 5)
    with pytest.raises(ValueError, match="needs ref_logp"):
        grpo_loss(logp, OLD, ADV, MASK, num_global_sequences=2)


# ------------------------------------------------------------------------------------ Clip-Cov

# One row of 4 valid tokens: A = [2, 2, -2, -2] (mean 0), logp = [-1, -3, -3, -1] (mean -2)
# -> cov = A * (logp + 2) = [2, -2, 2, -2]; candidates in (1, 5): tokens 0 and 2.
CC_ADV = _t([[2.0, 2.0, -2.0, -2.0]])
CC_LOGP = _t([[-1.0, -3.0, -3.0, -1.0]])
CC_MASK = torch.ones(1, 4)


def _clip_cov(logp, old, seed, **kw):
    gen = torch.Generator().manual_seed(seed)
    return clip_cov_loss(logp, old, CC_ADV, CC_MASK, generator=gen, num_global_tokens=4, **kw)


def test_clip_cov_random_pick_among_candidates():
    # r = 1 everywhere: per-token -A = [-2, -2, 2, 2], sum 0. k = max(int(2e-4 * 4), 1) = 1.
    # Zeroing token 0 leaves 2 / 4 = 0.5; zeroing token 2 leaves -2 / 4 = -0.5.
    losses = set()
    for seed in range(20):
        logp = CC_LOGP.clone().requires_grad_(True)
        loss, metrics = _clip_cov(logp, CC_LOGP, seed)
        assert metrics["clip_cov_frac"].item() == 0.25
        losses.add(round(loss.item(), 9))
        loss.backward()
        zeroed = (logp.grad == 0).nonzero()[:, 1].tolist()
        assert zeroed in ([0], [2])
    assert losses == {0.5, -0.5}  # both candidates get drawn
    # The same seed draws the same token.
    assert _clip_cov(CC_LOGP, CC_LOGP, 7)[0].item() == _clip_cov(CC_LOGP, CC_LOGP, 7)[0].item()


def test_clip_cov_skips_ppo_clipped_tokens():
    # Token 0 gets r = 3 > 1 + eps_high (eps 1 -> range [0, 2]) with A = 2 > 0: PPO-clipped,
    # so it is not a candidate; token 2 is always the one zeroed.
    # Per token: max(-6, -4) = -4, -2, (2 zeroed), 2 -> sum -4 -> -4 / 4 = -1.
    old = CC_LOGP.clone()
    old[0, 0] -= math.log(3)
    for seed in range(5):
        logp = CC_LOGP.clone().requires_grad_(True)
        loss, metrics = _clip_cov(logp, old, seed)
        assert loss.item() == pytest.approx(-1.0)
        assert metrics["clip_frac_high"].item() == 0.25
        loss.backward()
        torch.testing.assert_close(logp.grad, _t([[0.0, -0.5, 0.0, 0.5]]))


def test_clip_cov_ratio_caps_at_candidates_and_ignores_padding():
    # ratio 0.5 -> k = 2 = both candidates: -2 + 2 zeroed -> (-2 + 2) / 4 = 0.
    loss, metrics = _clip_cov(CC_LOGP, CC_LOGP, 0, clip_cov_ratio=0.5)
    assert loss.item() == 0.0 and metrics["clip_cov_frac"].item() == 0.5
    # A padded 5th token with a huge cov is never chosen and leaves the means unchanged.
    adv = torch.cat([CC_ADV, _t([[9.0]])], dim=1)
    logp = torch.cat([CC_LOGP, _t([[5.0]])], dim=1)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    gen = torch.Generator().manual_seed(0)
    loss, metrics = clip_cov_loss(
        logp, logp, adv, mask, generator=gen, num_global_tokens=4, clip_cov_ratio=0.5
    )
    assert loss.item() == 0.0 and metrics["clip_cov_frac"].item() == 0.5


# -------------------------------------------------------------------------------------- KL-Cov


def test_kl_cov_top_k_penalty():
    # A = [2, 0, 0, -2] (mean 0), logp = [-1, -3, -2, -2] (mean -2) -> cov = [2, 0, 0, 0].
    # log r = [0.1, 0.2, -0.3, 0]; per token -A r = [-2 e^0.1, 0, 0, 2].
    adv = _t([[2.0, 0.0, 0.0, -2.0]])
    logp0 = _t([[-1.0, -3.0, -2.0, -2.0]])
    old = logp0 - _t([[0.1, 0.2, -0.3, 0.0]])
    mask = torch.ones(1, 4)
    base = -2 * math.exp(0.1) + 2
    # ratio 0.25 -> k = 1: token 0 (cov 2) gets + |0.1|.
    logp = logp0.clone().requires_grad_(True)
    loss, metrics = kl_cov_loss(logp, old, adv, mask, num_global_tokens=4, kl_cov_ratio=0.25)
    assert loss.item() == pytest.approx((base + 0.1) / 4)
    assert metrics["kl_abs_mean"].item() == pytest.approx((0.1 + 0.2 + 0.3 + 0.0) / 4)
    assert metrics["kl_cov_frac"].item() == 0.25
    loss.backward()
    # Token 0: (-A r + sign(log r)) / 4; tokens 1, 2 have A = 0; token 3: -A r / 4 = 0.5.
    torch.testing.assert_close(logp.grad, _t([[(-2 * math.exp(0.1) + 1) / 4, 0.0, 0.0, 0.5]]))
    # ratio 0.5 -> k = 2: ties at cov 0 go to the lowest position, token 1 (+ |0.2|).
    loss2, _ = kl_cov_loss(logp0, old, adv, mask, num_global_tokens=4, kl_cov_ratio=0.5)
    assert loss2.item() == pytest.approx((base + 0.1 + 0.2) / 4)
    # The default ratio 2e-4 still penalizes max(1, int(4 * 2e-4)) = 1 token.
    loss3, _ = kl_cov_loss(logp0, old, adv, mask, num_global_tokens=4)
    assert loss3.item() == pytest.approx((base + 0.1) / 4)
    # kl_coef scales the penalty; ratio 0 penalizes nothing (as verl).
    loss4, _ = kl_cov_loss(
        logp0, old, adv, mask, num_global_tokens=4, kl_cov_ratio=0.25, kl_coef=2.0
    )
    assert loss4.item() == pytest.approx((base + 0.2) / 4)
    loss5, m5 = kl_cov_loss(logp0, old, adv, mask, num_global_tokens=4, kl_cov_ratio=0.0)
    assert loss5.item() == pytest.approx(base / 4) and m5["kl_cov_frac"].item() == 0.0


def test_kl_cov_ignores_padding():
    # Padded token with a large would-be cov; the valid tokens are as above.
    adv = _t([[2.0, 0.0, 0.0, -2.0, 50.0]])
    logp = _t([[-1.0, -3.0, -2.0, -2.0, 40.0]])
    old = logp - _t([[0.1, 0.2, -0.3, 0.0, 0.5]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, metrics = kl_cov_loss(logp, old, adv, mask, num_global_tokens=4, kl_cov_ratio=0.25)
    assert loss.item() == pytest.approx((-2 * math.exp(0.1) + 2 + 0.1) / 4)
    assert metrics["kl_cov_frac"].item() == 0.25


# ------------------------------------------------------------------ normalization contract


def _random_batch(seed: int, batch: int = 6, length: int = 7):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, length, generator=gen, dtype=F64) * 3
    logp = (old + 0.4 * torch.randn(batch, length, generator=gen, dtype=F64)).requires_grad_()
    adv = torch.randn(batch, 1, generator=gen, dtype=F64).expand(batch, length).contiguous()
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    return logp, old, adv, mask


@pytest.mark.parametrize("name", ["dapo", "grpo"])
def test_micro_batch_and_dp_splits_sum_to_the_global_loss(name):
    """Splitting the global batch over 2 DP ranks x 2 micro-batches, each part divided by the
    global count, sums to the whole-batch loss with identical gradients."""
    logp, old, adv, mask = _random_batch(seed=3)
    num_tokens, num_sequences = int(mask.sum()), int(mask.any(dim=-1).sum())
    loss_fn = functools.partial(
        LOSS_FNS[name], num_global_tokens=num_tokens, num_global_sequences=num_sequences
    )
    if name == "grpo":
        loss_fn = functools.partial(loss_fn, kl_beta=0.0)

    whole, _ = loss_fn(logp, old, adv, mask)
    (grad_whole,) = torch.autograd.grad(whole, logp)

    # rank 0: rows [0:1], [1:3]; rank 1: rows [3:5], [5:6].
    parts = [(0, 1), (1, 3), (3, 5), (5, 6)]
    total = sum(loss_fn(logp[a:b], old[a:b], adv[a:b], mask[a:b])[0] for a, b in parts)
    (grad_split,) = torch.autograd.grad(total, logp)
    torch.testing.assert_close(total, whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_split, grad_whole, rtol=1e-12, atol=1e-12)

    # Dividing each micro-batch by its own count (the bug the contract prevents) differs.
    if name == "dapo":
        wrong = sum(
            dapo_loss(
                logp[a:b],
                old[a:b],
                adv[a:b],
                mask[a:b],
                num_global_tokens=int(mask[a:b].sum()),
            )[0]
            / len(parts)
            for a, b in parts
        )
        assert abs(wrong.item() - whole.item()) > 1e-6


def test_registry():
    assert set(LOSS_FNS) == {"grpo", "dapo", "clip_cov", "kl_cov"}
    assert get_loss_fn("dapo") is dapo_loss
    with pytest.raises(ValueError, match="clip_cov, dapo, grpo, kl_cov"):
        get_loss_fn("ppo")


def test_grpo_context_parallel_chunks_sum_to_whole_sequence_loss():
    # CP holds chunks of each sequence: with whole-sequence token counts the chunks' losses
    # (and their gradients) add up to the whole-sequence seq-mean-token-mean.
    gen = torch.Generator().manual_seed(3)
    logp = torch.randn(3, 8, generator=gen, requires_grad=True)
    old = logp.detach() + 0.2 * torch.randn(3, 8, generator=gen)
    ref = logp.detach() - 0.1 * torch.randn(3, 8, generator=gen)
    adv = torch.randn(3, 1, generator=gen).expand(3, 8).contiguous()
    mask = (torch.rand(3, 8, generator=gen) > 0.3).float()
    whole, _ = grpo_loss(logp, old, adv, mask, num_global_sequences=3.0, ref_logp=ref)
    counts = mask.sum(dim=1)
    zigzag = [torch.tensor([0, 1, 6, 7]), torch.tensor([2, 3, 4, 5])]  # CP=2 chunk layout
    parts = [
        grpo_loss(
            logp[:, i],
            old[:, i],
            adv[:, i],
            mask[:, i],
            num_global_sequences=3.0,
            ref_logp=ref[:, i],
            sequence_token_counts=counts,
        )[0]  # fmt: skip
        for i in zigzag
    ]
    torch.testing.assert_close(sum(parts), whole, rtol=1e-6, atol=1e-7)
    (grad_whole,) = torch.autograd.grad(whole, logp)
    (grad_parts,) = torch.autograd.grad(sum(parts), logp)
    torch.testing.assert_close(grad_parts, grad_whole, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("algorithm", ["dapo", "grpo", "clip_cov"])
def test_policy_loss_honours_the_configured_clip_range(algorithm):
    # Clip-Cov used to ignore rl.eps_*: a ratio of 1.5 with A > 0 is clipped at 1 + eps_high.
    from megatron_longact.config.schema import RLConfig
    from megatron_longact.rl.losses import policy_loss

    logp = torch.log(_t([[1.5, 1.0]])).requires_grad_()
    old, adv, mask = _t([[0.0, 0.0]]), _t([[1.0, 1.0]]), torch.ones(1, 2)
    counts = dict(num_global_tokens=2.0, num_global_sequences=1.0)
    for eps_high, clipped in ((0.28, True), (1.0, False)):
        rl = RLConfig(algorithm=algorithm, eps_low=0.2, eps_high=eps_high, clip_cov_ratio=0.0)
        loss, metrics = policy_loss(rl, step=0)(logp, old, adv, mask, **counts)
        assert (metrics["clip_frac_high"].item() > 0) == clipped, (algorithm, eps_high)
