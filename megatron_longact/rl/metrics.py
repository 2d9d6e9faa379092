"""Rollout-side metrics of one RL step (identical on every rank)."""

from __future__ import annotations

import statistics

import torch
import torch.distributed as dist

from megatron_longact.config.schema import RLConfig
from megatron_longact.device import current_device
from megatron_longact.rl.experience import StepExperience


def logprob_mismatch(micro_batches: list[dict[str, torch.Tensor]]) -> float:
    """Mean |engine log-prob - trainer log-prob| over response tokens, global over DP.

    Computed where ``old_logp`` exists (the last pipeline stage); collective over the DP group.
    """
    from megatron.core import parallel_state

    total = torch.zeros(2, dtype=torch.float64)
    for batch in micro_batches:
        if "old_logp" in batch:
            mask = batch["response_mask"]
            diff = (batch["engine_logp"] - batch["old_logp"]).abs() * mask
            total += torch.tensor([diff.sum().item(), mask.sum().item()], dtype=torch.float64)
    total = total.to(current_device())
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return (total[0] / total[1].clamp(min=1)).item()


def experience_metrics(
    exp: StepExperience, micro_batches: list[dict[str, torch.Tensor]], *, rl: RLConfig
) -> dict[str, float]:
    """Reward mean/std, format rate, accuracy, response length, filter and mismatch stats.

    ``rollout/*`` describe every generated sample (the policy's current behaviour);
    ``rollout/kept_reward_mean`` the groups that passed the dynamic-sampling filter.
    """
    samples = exp.generated
    kept = [s.reward for g in exp.groups for s in g]
    rewards = [s.reward for s in samples]
    lengths = [len(s.response_ids) for s in samples]
    return {
        "rollout/reward_mean": statistics.fmean(rewards) if rewards else 0.0,
        "rollout/reward_std": statistics.pstdev(rewards) if len(rewards) > 1 else 0.0,
        "rollout/format_rate": statistics.fmean(s.format_ok for s in samples) if samples else 0.0,
        "rollout/accuracy": statistics.fmean(s.answer_ok for s in samples) if samples else 0.0,
        "rollout/response_len_mean": statistics.fmean(lengths) if lengths else 0.0,
        "rollout/truncated_frac": statistics.fmean(s.truncated for s in samples)
        if samples
        else 0.0,
        "rollout/kept_reward_mean": statistics.fmean(kept) if kept else 0.0,
        "rollout/num_groups": float(len(exp.groups)),
        "rollout/gen_rounds": float(exp.num_gen_batches),
        "rollout/generated": float(len(exp.generated)),
        "rollout/engine_responses": float(exp.num_engine_responses),
        "rollout/kept_group_frac": len(exp.groups) / max(exp.num_groups_seen, 1),
        "rollout/engine_logprob_mismatch": logprob_mismatch(micro_batches),
    }


def layout_metrics(micro_batches: list[dict[str, torch.Tensor]], *, plan) -> dict[str, float]:
    """How the step's data was laid out: padding share of the rows' tokens (all DP ranks
    together; collective over the DP group), DP imbalance and micro-batches per update."""
    from megatron.core import parallel_state

    total = torch.tensor([sum(b["tokens"].numel() for b in micro_batches),
                          sum(float(b["token_mask"].sum()) for b in micro_batches)],
                         dtype=torch.float64).to(current_device())  # fmt: skip
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return {
        "rl/padding_frac": 1.0 - (total[1] / total[0].clamp(min=1)).item(),
        "rl/dp_imbalance": plan.imbalance,
        "rl/microbatches_per_update": statistics.fmean(len(u[0]) for u in plan.updates),
        "rl/oversize_sequences": float(plan.num_oversize),
    }


def mean_results(results: list):
    """One ``StepResult`` for the ``rl.num_minibatches`` updates of a step: loss, grad norm and
    reported metrics averaged over the updates, token counts summed, the last lr."""
    from dataclasses import replace

    if len(results) == 1:
        return results[0]
    return replace(
        results[-1],
        loss=statistics.fmean(r.loss for r in results),
        grad_norm=statistics.fmean(r.grad_norm for r in results),
        num_tokens=sum(r.num_tokens for r in results),
        update_successful=all(r.update_successful for r in results),
        extras={k: statistics.fmean(r.extras[k] for r in results) for k in results[-1].extras},
    )
