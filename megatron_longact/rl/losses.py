"""Policy-gradient losses for GRPO, DAPO, Clip-Cov and KL-Cov, one function each.

Notation (all tensors [B, T], B sequences of a micro-batch, T response positions):
    logp       log pi_theta(y_t | ...) of the sampled tokens, with grad
    old_logp   the same under the policy that generated the rollouts (no grad)
    A          per-token advantage (the sequence's advantage on its response tokens, ``rl.batch``)
    m          1 on valid response tokens, 0 on prompt and padding
    r_t        exp(clamp(logp - old_logp, -20, 20)), the importance ratio

The normalization contract (every loss here)
--------------------------------------------
Each function returns the micro-batch's share of the *global-batch* loss: the sum of its
per-token (or per-sequence) terms divided by a count over the whole global batch, all
micro-batches and all data-parallel ranks together. Summing the returned values over
micro-batches and DP ranks then gives exactly the global-batch loss, however the batch is split.
- token-mean (DAPO, Clip-Cov, KL-Cov): divide by ``num_global_tokens``, the number of valid
  response tokens in the global batch.
- seq-mean-token-mean (GRPO, paper Eq. 5): each sequence's token sum is divided by its own
  token count, and the sum over sequences by ``num_global_sequences``, the number of sequences
  with at least one valid token in the global batch.

Megatron must then not average again. The training path (``rl.forward.policy_forward_step``)
uses megatron's ``calculate_per_token_loss=True``: it calls these functions with
``num_global_tokens=1`` / ``num_global_sequences=1`` (the plain sum) and returns
``(sum, local_count, metrics)``, local_count being this micro-batch's tokens (GRPO: its
sequences, each counted on one CP rank only); megatron sums the counts over DP x CP and divides
the gradients by that total in ``finalize_model_grads``. (The other way, a 2-tuple loss with
``calculate_per_token_loss=False``, has megatron divide by ``num_microbatches`` and DDP by
DP x CP; a caller would then pass the global counts and multiply back.)

With context parallelism a rank sees only chunks of each sequence: the token-mean losses stay
exact; GRPO takes each sequence's whole-sequence token count (``sequence_token_counts``) so
that the CP-summed loss is exact; the Clip-Cov/KL-Cov selections are per chunk (verl's are per
micro-batch, an approximation too).

Padded positions are multiplied by 0, so they must hold finite values. Metrics are detached
0-d tensors, masked means over this micro-batch's valid tokens; average them for logging.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from megatron_longact.config.schema import (
    CLIP_COV_LB,
    CLIP_COV_RATIO,
    CLIP_COV_UB,
    DAPO_EPS_HIGH,
    DAPO_EPS_LOW,
    DUAL_CLIP_C,
    KL_COV_COEF,
    KL_COV_RATIO,
    RLConfig,
)
from megatron_longact.errors import UserError

# One set of defaults, shared with RLConfig (config/schema.py); the two below belong to one
# algorithm each and have no config field of their own (rl.eps_* override them).
GRPO_EPS = 0.2  # the paper's Eq. 5 clips symmetrically
CLIP_COV_EPS = 1.0  # verl's Clip-Cov recipe scripts set eps_low = eps_high = 1
LOG_RATIO_CLAMP = 20.0  # verl clamps log(r) to [-20, 20] before exp
# GRPO KL to the reference model (k3 estimator).
GRPO_KL_BETA = 0.01  # NeMo-RL's default; DAPO uses no KL
KL_INNER_CLAMP = 20.0  # clamp on ref - logp before exp, as verl's low_var_kl
KL_CLAMP = 10.0  # clamp on the k3 value, as verl


# ---------------------------------------------------------------------------------------------
# Helpers


def masked_mean(
    values: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None
) -> torch.Tensor:
    """Mean of ``values`` over entries where ``mask`` is 1 (0 where the mask is empty).

    ``mask`` holds 0/1 (or bool) and broadcasts against ``values``; ``dim`` None reduces all.
    """
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def _check_inputs(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T]; got shape {tuple(logp.shape)}")
    for name, t in (("old_logp", old_logp), ("advantages", advantages), ("mask", mask)):
        if t.shape != logp.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {tuple(logp.shape)}")
    return mask.to(logp.dtype)


def _require_count(value: float | None, name: str, loss: str) -> float:
    if value is None or value <= 0:
        raise ValueError(
            f"{loss} needs {name} > 0 (got {value}): the global-batch count summed over "
            "micro-batches and all-reduced over DP (module docstring)"
        )
    return float(value)


def _ratio(logp: torch.Tensor, old_logp: torch.Tensor, clamp: float | None) -> torch.Tensor:
    log_ratio = logp - old_logp
    if clamp is not None:
        log_ratio = log_ratio.clamp(-clamp, clamp)
    return torch.exp(log_ratio)


def _clipped_pg(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float,
    eps_high: float,
    dual_clip_c: float | None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token PPO-clip loss with optional dual clip, [B, T]; the [B, T] bool mask of tokens
    the PPO clip is active on; clip metrics."""
    if dual_clip_c is not None and dual_clip_c <= 1.0:
        raise UserError(f"dual_clip_c={dual_clip_c} must be > 1 (3 or 10), or None to disable")
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(loss_unclipped, loss_clipped)
    # The clip is active exactly where loss_clipped > loss_unclipped: r > 1 + eps_high with
    # A > 0, or r < 1 - eps_low with A < 0.
    clipped = loss_clipped > loss_unclipped
    metrics = {
        "clip_frac_high": masked_mean((clipped & (advantages > 0)).to(ratio.dtype), mask),
        "clip_frac_low": masked_mean((clipped & (advantages < 0)).to(ratio.dtype), mask),
    }
    if dual_clip_c is not None:
        # For A < 0 a huge ratio makes -A*r unbounded; cap the loss at -A*c.
        cap = -advantages * dual_clip_c
        dual = (advantages < 0) & (loss > cap)
        loss = torch.where(advantages < 0, torch.minimum(loss, cap), loss)
        metrics["dual_clip_frac"] = masked_mean(dual.to(ratio.dtype), mask)
    return loss, clipped, metrics


def _ratio_metrics(
    logp: torch.Tensor, old_logp: torch.Tensor, ratio: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    return {
        # verl's ppo_kl: mean of log(pi_old / pi_theta) over valid tokens.
        "approx_kl": masked_mean(old_logp - logp, mask),
        "ratio_mean": masked_mean(ratio, mask),
    }


def _weighted(per_token: torch.Tensor, token_weights: torch.Tensor | None) -> torch.Tensor:
    """The per-token policy-gradient term times the rollout-correction weights (constants)."""
    if token_weights is None:
        return per_token
    if token_weights.shape != per_token.shape:
        raise ValueError(f"token_weights has shape {tuple(token_weights.shape)}; expected "
                         f"{tuple(per_token.shape)}")  # fmt: skip
    return per_token * token_weights.detach().to(per_token.dtype)


def _detach(metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in metrics.items()}


def _centered_cov(advantages: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """cov_t = (A_t - mean A)(logp_t - mean logp), means over this micro-batch's valid tokens.

    Detached: it only selects tokens. The means are local, as in verl (the paper's authors note
    this approximates a global statistic).
    """
    advantages, logp = advantages.detach(), logp.detach()
    return (advantages - masked_mean(advantages, mask)) * (logp - masked_mean(logp, mask))


# ---------------------------------------------------------------------------------------------
# Losses


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    num_global_sequences: float | None = None,
    num_global_tokens: float | None = None,
    ref_logp: torch.Tensor | None = None,
    kl_beta: float = GRPO_KL_BETA,
    eps_low: float = GRPO_EPS,
    eps_high: float = GRPO_EPS,
    dual_clip_c: float | None = DUAL_CLIP_C,
    log_ratio_clamp: float | None = LOG_RATIO_CLAMP,
    sequence_token_counts: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO (paper Eq. 5): clipped surrogate plus beta * KL, seq-mean-token-mean.

    Per token: l_t = max(-A r_t, -A clip(r_t, 1 - eps_low, 1 + eps_high)), capped at -A c when
    A < 0 (dual clip), plus beta * k3_t with
        k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1,
    (ref_t - logp_t) clamped to [-20, 20] and k3 to [-10, 10] as verl's low_var_kl.
    Loss = sum_i [ sum_t l_{i,t} m_{i,t} / sum_t m_{i,t} ] / num_global_sequences.

    Args:
        logp, old_logp, advantages, mask: [B, T] (see module docstring).
        num_global_sequences: sequences with >= 1 valid token in the global batch.
        num_global_tokens: unused (accepted so all losses share one call).
        ref_logp: [B, T] reference-model log-probs; required when ``kl_beta`` > 0.
        kl_beta: KL weight beta (0 disables the term).
        eps_low, eps_high: clip range; the paper's GRPO is symmetric (0.2).
        dual_clip_c: dual-clip constant c > 1, None disables.
        log_ratio_clamp: clamp on logp - old_logp before exp, None disables.
        sequence_token_counts: [B] each sequence's valid tokens over the WHOLE sequence, or
            [B, T] each token's sequence's count (packed rows hold several sequences). With
            context parallel a rank holds chunks of each sequence; dividing its partial sums
            by the whole count keeps the CP-summed loss exact. None: count from ``mask``.
        token_weights: [B, T] detached rollout-correction weights (``rl.correction``) that
            multiply the clipped policy-gradient term l_t (not the KL); None: 1.

    Returns:
        (loss scalar, metrics: clip_frac_low/high, dual_clip_frac, approx_kl, ratio_mean, kl).
    """
    del num_global_tokens
    maskf = _check_inputs(logp, old_logp, advantages, mask)
    num_seqs = _require_count(num_global_sequences, "num_global_sequences", "grpo_loss")
    ratio = _ratio(logp, old_logp, log_ratio_clamp)
    per_token, _, metrics = _clipped_pg(
        ratio,
        advantages,
        maskf,
        eps_low=eps_low,
        eps_high=eps_high,
        dual_clip_c=dual_clip_c,
    )
    per_token = _weighted(per_token, token_weights)
    if kl_beta > 0:
        if ref_logp is None:
            raise UserError(
                f"grpo_loss: kl_beta={kl_beta} needs ref_logp from the reference model; "
                "pass ref_logp or set kl_beta=0"
            )
        diff = (ref_logp - logp).clamp(-KL_INNER_CLAMP, KL_INNER_CLAMP)
        kl = (torch.exp(diff) - diff - 1.0).clamp(-KL_CLAMP, KL_CLAMP)
        per_token = per_token + kl_beta * kl
        metrics["kl"] = masked_mean(kl, maskf)
    if sequence_token_counts is None:
        sequence_token_counts = maskf.sum(dim=-1)
    token_counts = sequence_token_counts.to(maskf.dtype).clamp(min=1)
    if token_counts.dim() == 2:  # per token: sum_i sum_t l m / n_i without a [B] reduction
        loss = (per_token * maskf / token_counts).sum() / num_seqs
    else:
        per_sequence = (per_token * maskf).sum(dim=-1) / token_counts
        loss = per_sequence.sum() / num_seqs
    metrics.update(_ratio_metrics(logp, old_logp, ratio, maskf))
    return loss, _detach(metrics)


def dapo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    num_global_tokens: float | None = None,
    num_global_sequences: float | None = None,
    eps_low: float = DAPO_EPS_LOW,
    eps_high: float = DAPO_EPS_HIGH,
    dual_clip_c: float | None = DUAL_CLIP_C,
    log_ratio_clamp: float | None = LOG_RATIO_CLAMP,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DAPO (Yu et al. 2025): clip-higher PPO surrogate, token-mean, no KL.

    Per token: l_t = max(-A r_t, -A clip(r_t, 1 - eps_low, 1 + eps_high)) with
    eps_low 0.2 < eps_high 0.28, capped at -A c when A < 0 (dual clip, None disables).
    Loss = sum_{b,t} l_{b,t} m_{b,t} / num_global_tokens.

    Args:
        logp, old_logp, advantages, mask: [B, T] (see module docstring).
        num_global_tokens: valid response tokens in the global batch (all micro-batches, DP).
        num_global_sequences: unused (accepted so all losses share one call).
        token_weights: [B, T] detached rollout-correction weights multiplying l_t; None: 1.

    Returns:
        (loss scalar, metrics: clip_frac_low/high, dual_clip_frac, approx_kl, ratio_mean).
    """
    del num_global_sequences
    maskf = _check_inputs(logp, old_logp, advantages, mask)
    num_tokens = _require_count(num_global_tokens, "num_global_tokens", "dapo_loss")
    ratio = _ratio(logp, old_logp, log_ratio_clamp)
    per_token, _, metrics = _clipped_pg(
        ratio,
        advantages,
        maskf,
        eps_low=eps_low,
        eps_high=eps_high,
        dual_clip_c=dual_clip_c,
    )
    loss = (_weighted(per_token, token_weights) * maskf).sum() / num_tokens
    metrics.update(_ratio_metrics(logp, old_logp, ratio, maskf))
    return loss, _detach(metrics)


def clip_cov_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    generator: torch.Generator,
    num_global_tokens: float | None = None,
    num_global_sequences: float | None = None,
    clip_cov_ratio: float = CLIP_COV_RATIO,
    clip_cov_lb: float = CLIP_COV_LB,
    clip_cov_ub: float = CLIP_COV_UB,
    eps_low: float = CLIP_COV_EPS,
    eps_high: float = CLIP_COV_EPS,
    log_ratio_clamp: float | None = LOG_RATIO_CLAMP,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clip-Cov (Cui et al. 2025): drop the gradient of a few high-covariance tokens.

    1. l_t = max(-A r_t, -A clip(r_t, 1 - eps_low, 1 + eps_high)); no dual clip.
    2. cov_t = (A_t - mean A)(logp_t - mean logp) over this micro-batch's valid tokens.
    3. Candidates: valid tokens not already clipped by PPO with lb < cov_t < ub.
    4. k = max(int(clip_cov_ratio * N_valid), 1) candidates (fewer if there are fewer) chosen
       uniformly at random with ``generator``; their loss weight is 0, all others 1.
    5. Loss = sum_{b,t} l_{b,t} w_{b,t} m_{b,t} / num_global_tokens (token-mean).
    verl does not clamp log r here; the default clamp at +-20 changes nothing below that.

    Args:
        logp, old_logp, advantages, mask: [B, T] (see module docstring).
        generator: a seeded CPU ``torch.Generator``; the draw is made on CPU so the same seed
            picks the same tokens on any device.
        num_global_tokens: valid response tokens in the global batch.
        num_global_sequences: unused.
        clip_cov_ratio, clip_cov_lb, clip_cov_ub: fraction picked and the cov window (2e-4,
            1, 5 in the paper's recipe).
        eps_low, eps_high: PPO clip range (the recipe uses 1 and 1).
        token_weights: [B, T] detached rollout-correction weights multiplying l_t; None: 1.

    Returns:
        (loss scalar, metrics: clip_cov_frac (tokens zeroed / valid tokens), clip_frac_low/high,
        approx_kl, ratio_mean).
    """
    del num_global_sequences
    maskf = _check_inputs(logp, old_logp, advantages, mask)
    num_tokens = _require_count(num_global_tokens, "num_global_tokens", "clip_cov_loss")
    if not 0.0 <= clip_cov_ratio <= 1.0 or clip_cov_lb >= clip_cov_ub:
        raise UserError(
            f"clip_cov_ratio={clip_cov_ratio} must lie in [0, 1] and clip_cov_lb={clip_cov_lb} "
            f"< clip_cov_ub={clip_cov_ub} (paper: 2e-4, 1, 5)"
        )
    ratio = _ratio(logp, old_logp, log_ratio_clamp)
    per_token, already_clipped, metrics = _clipped_pg(
        ratio, advantages, maskf, eps_low=eps_low, eps_high=eps_high, dual_clip_c=None
    )
    valid = maskf > 0
    cov = _centered_cov(advantages, logp, maskf)
    candidates = valid & ~already_clipped & (cov > clip_cov_lb) & (cov < clip_cov_ub)
    candidate_idx = torch.nonzero(candidates.flatten()).squeeze(-1)
    num_valid = int(valid.sum().item())
    k = min(max(int(clip_cov_ratio * num_valid), 1), candidate_idx.numel())
    weight = torch.ones_like(maskf)
    if k > 0:
        perm = torch.randperm(candidate_idx.numel(), generator=generator)[:k]
        chosen = candidate_idx[perm.to(candidate_idx.device)]
        weight.view(-1)[chosen] = 0.0
    loss = (_weighted(per_token, token_weights) * weight * maskf).sum() / num_tokens
    metrics["clip_cov_frac"] = masked_mean((weight == 0).to(maskf.dtype), maskf)
    metrics.update(_ratio_metrics(logp, old_logp, ratio, maskf))
    return loss, _detach(metrics)


def kl_cov_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    num_global_tokens: float | None = None,
    num_global_sequences: float | None = None,
    kl_cov_ratio: float = KL_COV_RATIO,
    kl_coef: float = KL_COV_COEF,
    log_ratio_clamp: float | None = LOG_RATIO_CLAMP,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KL-Cov (Cui et al. 2025): a |log-ratio| penalty on the top-covariance tokens.

    1. l_t = -A_t r_t (no PPO clipping).
    2. cov_t = (A_t - mean A)(logp_t - mean logp) over this micro-batch's valid tokens.
    3. The k = max(1, int(N_valid * kl_cov_ratio)) valid tokens of largest cov (ties broken
       by position, so the pick is deterministic) get l_t += kl_coef * |logp_t - old_logp_t|.
    4. Loss = sum_{b,t} l_{b,t} m_{b,t} / num_global_tokens (token-mean).
    verl does not clamp log r here; the default clamp at +-20 changes nothing below that.

    Args:
        logp, old_logp, advantages, mask: [B, T] (see module docstring).
        num_global_tokens: valid response tokens in the global batch.
        num_global_sequences: unused.
        kl_cov_ratio: fraction of valid tokens penalized (2e-4; the 7B recipe uses 2e-3).
        kl_coef: ppo_kl_coef, the penalty weight (1).
        token_weights: [B, T] detached rollout-correction weights multiplying -A_t r_t (not
            the penalty); None: 1.

    Returns:
        (loss scalar, metrics: kl_abs_mean (masked mean |logp - old_logp|), kl_cov_frac
        (penalized / valid), approx_kl, ratio_mean).
    """
    del num_global_sequences
    maskf = _check_inputs(logp, old_logp, advantages, mask)
    num_tokens = _require_count(num_global_tokens, "num_global_tokens", "kl_cov_loss")
    if not 0.0 <= kl_cov_ratio <= 1.0:
        raise UserError(f"kl_cov_ratio={kl_cov_ratio} must lie in [0, 1] (paper: 2e-4)")
    ratio = _ratio(logp, old_logp, log_ratio_clamp)
    abs_kl = (logp - old_logp).abs()
    per_token = _weighted(-advantages * ratio, token_weights)
    valid_idx = torch.nonzero(maskf.flatten() > 0).squeeze(-1)
    penalized = torch.zeros_like(maskf)
    # As verl: a ratio of 0 penalizes nothing, any positive ratio at least one token.
    if valid_idx.numel() > 0 and kl_cov_ratio > 0:
        k = max(1, int(valid_idx.numel() * kl_cov_ratio))
        cov = _centered_cov(advantages, logp, maskf).flatten()[valid_idx]
        order = torch.sort(cov, descending=True, stable=True).indices[:k]
        penalized.view(-1)[valid_idx[order]] = 1.0
    per_token = per_token + kl_coef * abs_kl * penalized
    loss = (per_token * maskf).sum() / num_tokens
    metrics = {
        "kl_abs_mean": masked_mean(abs_kl, maskf),
        "kl_cov_frac": masked_mean(penalized, maskf),
    }
    metrics.update(_ratio_metrics(logp, old_logp, ratio, maskf))
    return loss, _detach(metrics)


LossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]

# Every loss accepts (logp, old_logp, advantages, mask, *, num_global_tokens,
# num_global_sequences, ...) so the loop can bind the algorithm's options with
# functools.partial and call any of them the same way.
LOSS_FNS: dict[str, LossFn] = {
    "grpo": grpo_loss,
    "dapo": dapo_loss,
    "clip_cov": clip_cov_loss,
    "kl_cov": kl_cov_loss,
}


def get_loss_fn(name: str) -> LossFn:
    """The loss registered as ``name`` in ``LOSS_FNS``; ValueError listing the valid names."""
    fn = LOSS_FNS.get(name)
    if fn is None:
        raise UserError(f"unknown loss '{name}'; valid names: {', '.join(sorted(LOSS_FNS))}")
    return fn


def policy_loss(rl: RLConfig, *, step: int) -> LossFn:
    """``rl.algorithm``'s loss with its options bound from ``rl``: the RL step's one loss.

    DAPO, GRPO and Clip-Cov take the PPO clip range ``rl.eps_low`` / ``rl.eps_high`` (KL-Cov
    does not clip). Clip-Cov's token draw is seeded with ``rl.seed + step``: the same on every
    rank, new each step.
    """
    clip = dict(eps_low=rl.eps_low, eps_high=rl.eps_high)
    options = {
        "dapo": dict(**clip, dual_clip_c=rl.dual_clip_c),
        "grpo": dict(**clip, dual_clip_c=rl.dual_clip_c, kl_beta=rl.kl_beta),
        "clip_cov": dict(
            **clip,
            clip_cov_ratio=rl.clip_cov_ratio,
            clip_cov_lb=rl.clip_cov_lb,
            clip_cov_ub=rl.clip_cov_ub,
            generator=torch.Generator().manual_seed(rl.seed + step),
        ),
        "kl_cov": dict(kl_cov_ratio=rl.kl_cov_ratio, kl_coef=rl.kl_cov_coef),
    }[rl.algorithm]
    return partial(get_loss_fn(rl.algorithm), **options)
