"""Rollout correction: the gap between the engine that sampled and the trainer that learns.

The rollouts are sampled by the engine (vLLM's kernels, bf16) under pi_engine, while the loss's
old log-probs come from the trainer under pi_old; the two differ even with the same weights.
Two corrections, both off by default (``rl.rollout_is``, ``rl.rollout_mask_threshold``), as verl
(``algorithm.rollout_correction``: token-level truncated IS and rejection sampling,
``docs/algo/rollout_corr.md``), NeMo-RL (``use_importance_sampling_correction``) and TRL
(``vllm_importance_sampling_correction``, mode ``sequence_mask``) ship them:

* token-level truncated importance sampling: each response token's policy-gradient term is
  multiplied by w_t = min(pi_old(y_t) / pi_engine(y_t), C) = exp(min(old_t - engine_t, log C)),
  detached (a constant of the loss, no gradient);
* sequence-level masking: a rollout whose mismatch
  d_i = mean over its response tokens of |old_t - engine_t|
  exceeds the threshold gets weight 0 on every token (it still counts in the loss's token
  normalization, as TRL's ``sequence_mask``: the loss scale does not jump with the masked
  fraction).

The functions take per-token tensors of any shape (padded rows [b, L] or packed tokens [T]) and
a per-token sequence index of the same shape, so per-sequence reductions work both on rows and
on THD-packed micro-batches. :func:`apply_rollout_correction` is the RL step's one call: it adds
the weights to each micro-batch (``ROLLOUT_WEIGHTS``, which the losses multiply in) and returns
the metrics, reduced over data parallel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_longact.config.schema import RLConfig

ROLLOUT_WEIGHTS = "rollout_weights"
"""Micro-batch field of the per-token weights (same shape as ``old_logp``)."""


@dataclass(frozen=True, kw_only=True)
class CorrectionStats:
    """Sums over one or more micro-batches (add them, then :meth:`metrics`)."""

    weight_sum: float = 0.0
    """Sum of the final weights over response tokens."""
    weight_max: float = 0.0
    num_tokens: float = 0.0
    num_truncated: float = 0.0
    """Response tokens whose ratio exceeded the cap."""
    num_sequences: float = 0.0
    num_masked: float = 0.0
    """Sequences masked for their mismatch."""

    def __add__(self, other: CorrectionStats) -> CorrectionStats:
        return CorrectionStats(
            weight_sum=self.weight_sum + other.weight_sum,
            weight_max=max(self.weight_max, other.weight_max),
            num_tokens=self.num_tokens + other.num_tokens,
            num_truncated=self.num_truncated + other.num_truncated,
            num_sequences=self.num_sequences + other.num_sequences,
            num_masked=self.num_masked + other.num_masked,
        )

    def metrics(self) -> dict[str, float]:
        """``correction/*``: weights' mean and max over response tokens, the fraction of
        tokens truncated at the cap, the fraction of sequences masked."""
        return {
            "correction/weight_mean": self.weight_sum / max(self.num_tokens, 1.0),
            "correction/weight_max": self.weight_max,
            "correction/truncated_frac": self.num_truncated / max(self.num_tokens, 1.0),
            "correction/masked_seq_frac": self.num_masked / max(self.num_sequences, 1.0),
        }


def truncated_is_weights(
    old_logp: torch.Tensor, engine_logp: torch.Tensor, *, cap: float
) -> torch.Tensor:
    """w_t = min(pi_old / pi_engine, cap) per token, detached, fp32, any shape.

    Computed as exp(min(old - engine, log cap)): no overflow for any log-ratio.
    """
    if cap < 1:
        raise ValueError(f"rl.rollout_is_cap={cap} must be >= 1")
    log_ratio = old_logp.detach().float() - engine_logp.detach().float()
    return torch.exp(log_ratio.clamp(max=math.log(cap)))


def sequence_mismatch(
    old_logp: torch.Tensor,
    engine_logp: torch.Tensor,
    mask: torch.Tensor,
    seq_index: torch.Tensor,
    *,
    num_sequences: int,
) -> torch.Tensor:
    """d_i = mean over sequence i's response tokens of |old - engine|: fp32 [num_sequences]
    (0 for a sequence without response tokens).

    ``mask`` is 1 on response tokens; ``seq_index`` (int64, the shape of the others) names
    each token's sequence in [0, num_sequences).
    """
    maskf = mask.detach().float().flatten()
    gap = (old_logp.detach().float() - engine_logp.detach().float()).abs().flatten() * maskf
    index = seq_index.flatten().long()
    sums = torch.zeros(num_sequences, dtype=torch.float32, device=gap.device)
    counts = torch.zeros_like(sums)
    sums.index_add_(0, index, gap)
    counts.index_add_(0, index, maskf)
    return sums / counts.clamp(min=1.0)


def correction_weights(
    old_logp: torch.Tensor,
    engine_logp: torch.Tensor,
    mask: torch.Tensor,
    seq_index: torch.Tensor,
    *,
    num_sequences: int,
    is_cap: float | None,
    mask_threshold: float | None,
) -> tuple[torch.Tensor, CorrectionStats]:
    """Per-token weights (fp32, the shape of ``old_logp``, detached; 0 off the response) and
    their statistics.

    ``is_cap`` None: no importance weights (1 per token); ``mask_threshold`` None: no
    sequence masking. See the module docstring for the formulas.
    """
    maskf = mask.detach().float()
    if is_cap is None:
        weights = torch.ones_like(maskf)
        truncated = torch.zeros_like(maskf)
    else:
        weights = truncated_is_weights(old_logp, engine_logp, cap=is_cap)
        truncated = (weights >= is_cap).float()
    present = torch.zeros(num_sequences, device=maskf.device)
    present.index_add_(0, seq_index.flatten().long(), maskf.flatten())
    present = present > 0
    masked = torch.zeros(num_sequences, dtype=torch.bool, device=maskf.device)
    if mask_threshold is not None:
        gap = sequence_mismatch(old_logp, engine_logp, maskf, seq_index,
                                num_sequences=num_sequences)  # fmt: skip
        masked = (gap > mask_threshold) & present
    keep = (~masked).float()[seq_index.long()]
    weights = weights * keep * maskf
    stats = CorrectionStats(
        weight_sum=float(weights.sum()),
        weight_max=float(weights.max()) if weights.numel() else 0.0,
        num_tokens=float(maskf.sum()),
        num_truncated=float((truncated * maskf).sum()),
        num_sequences=float(present.sum()),
        num_masked=float(masked.sum()),
    )
    return weights, stats


def row_sequence_index(shape: torch.Size) -> tuple[torch.Tensor, int]:
    """The sequence index of padded rows [b, L]: row r's tokens are sequence r."""
    rows = shape[0]
    return torch.arange(rows)[:, None].expand(shape), rows


def apply_rollout_correction(
    micro_batches: list[dict[str, torch.Tensor]], *, rl: RLConfig
) -> dict[str, float]:
    """Adds ``ROLLOUT_WEIGHTS`` to every micro-batch holding ``old_logp`` (and
    ``engine_logp``, ``response_mask``), and returns ``correction/*`` metrics over the global
    batch, for ``rl.rollout_is`` / ``rl.rollout_is_cap`` / ``rl.rollout_mask_threshold``.
    Nothing is added, and {} returned, when both corrections are off.

    A micro-batch's sequences are told apart by its ``sequence_ids`` (``rl.batch``: packed
    or padded rows), else they are its rows [b, L]. Collective over the data-parallel group (the metrics); ranks
    without ``old_logp`` (earlier pipeline stages) add nothing but still join.
    """
    is_cap = rl.rollout_is_cap if rl.rollout_is else None
    mask_threshold = rl.rollout_mask_threshold
    if is_cap is None and mask_threshold is None:
        return {}
    total = CorrectionStats()
    for batch in micro_batches:
        if "old_logp" not in batch:
            continue
        if "sequence_ids" in batch:  # rl.batch: the token's sequence, -1 on padding
            index = batch["sequence_ids"].clamp(min=0)  # padding has response_mask 0
            count = int(index.max()) + 1 if index.numel() else 0
        else:
            index, count = row_sequence_index(batch["old_logp"].shape)
        weights, stats = correction_weights(
            batch["old_logp"], batch["engine_logp"], batch["response_mask"], index,
            num_sequences=count, is_cap=is_cap, mask_threshold=mask_threshold,
        )  # fmt: skip
        batch[ROLLOUT_WEIGHTS] = weights
        total = total + stats
    return _reduce_over_dp(total).metrics()


def _reduce_over_dp(stats: CorrectionStats) -> CorrectionStats:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_longact.device import current_device

    if not dist.is_initialized():
        return stats
    group = parallel_state.get_data_parallel_group()
    sums = torch.tensor([stats.weight_sum, stats.num_tokens, stats.num_truncated,
                         stats.num_sequences, stats.num_masked], dtype=torch.float64,
                        device=current_device())  # fmt: skip
    peak = torch.tensor([stats.weight_max], dtype=torch.float64, device=current_device())
    dist.all_reduce(sums, group=group)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    weight_sum, tokens, truncated, sequences, masked = sums.tolist()
    return CorrectionStats(weight_sum=weight_sum, weight_max=peak.item(), num_tokens=tokens,
                           num_truncated=truncated, num_sequences=sequences,
                           num_masked=masked)  # fmt: skip
