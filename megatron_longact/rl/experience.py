"""Rollout -> reward -> dynamic-sampling filter -> advantages: the experience of one RL step.

Data and context parallel: each DP replica takes its share of the prompts (round-robin), and
under CP its CP ranks split the replica's rollouts (prompts x rollouts_per_prompt, contiguous
chunks): each (DP, CP) rank generates its own, with full local attention, and all TP ranks of it
decode in lockstep. No rollout is generated twice. The scored rollouts are then all-gathered over
DP x CP so that every rank holds the same global batch; filtering and advantages are therefore
identical everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_longact.config.schema import RLConfig
from megatron_longact.data.chat_template import generation_think_prefix
from megatron_longact.data.prompts import encode_prompt
from megatron_longact.data.rl_data import RLRecord
from megatron_longact.rl.advantages import group_advantages
from megatron_longact.rl.reward_spec import resolve_reward
from megatron_longact.rl.rollout.types import Rollout, RolloutEngine, SamplingParams
from megatron_longact.rl.sampling import (
    DynamicSamplingState,
    add_generation_batch,
    filter_groups,
    overlong_penalty,
    pop_train_batch,
)


@dataclass(kw_only=True)
class Sample:
    """One scored rollout, ready to become a training row."""

    prompt_ids: list[int]
    response_ids: list[int]
    engine_logprobs: list[float]
    reward: float
    format_ok: bool
    answer_ok: bool
    truncated: bool
    advantage: float = 0.0


@dataclass(kw_only=True)
class StepExperience:
    groups: list[list[Sample]]
    """The kept groups (the training batch), advantages filled in."""
    generated: list[Sample]
    """Every sample generated this step, kept or filtered (unbiased reward statistics)."""
    num_gen_batches: int
    num_groups_seen: int
    prompts_consumed: int
    num_engine_responses: int
    """Responses the engines returned this step, summed over DP x CP ranks (one TP rank each):
    equals ``len(generated)`` when every rollout is generated once."""


def _score(
    rollout: Rollout, record: RLRecord, *, tokenizer, rl: RLConfig, think_prefix: str = ""
) -> Sample:
    # A template whose generation prompt opens the think block (think_prefix "<think>\n") puts
    # that tag in the prompt, as in the SFT targets; the reward reads it as part of the response.
    # The engine's text is cut after the stop string that ended the response (vLLM's output).
    response = rollout.text
    if response is None:
        response = tokenizer.decode(rollout.response_ids, skip_special_tokens=False)
    text = think_prefix + response
    result = resolve_reward(rl.reward)(text, record)
    reward = result.score
    if rl.overlong_buffer > 0:
        reward += float(
            overlong_penalty(
                torch.tensor([len(rollout.response_ids)]),
                max_response_length=rl.max_new_tokens,
                buffer_length=rl.overlong_buffer,
                penalty_factor=rl.overlong_penalty,
            )[0]
        )
    return Sample(
        prompt_ids=rollout.prompt_ids,
        response_ids=rollout.response_ids,
        engine_logprobs=rollout.logprobs,
        reward=reward,
        format_ok=result.format_ok,
        answer_ok=result.answer_ok,
        truncated=rollout.finish_reason == "length",
    )


def replica_share(
    num_records: int, *, rollouts_per_prompt: int, dp: int, dp_rank: int, cp: int, cp_rank: int
) -> list[tuple[int, int]]:
    """The (record index, rollout index) pairs one (DP, CP) rank generates, in order.

    Records go round-robin over DP replicas (balanced), and a replica's rollouts (records in
    order, ``rollouts_per_prompt`` each) are split into CP contiguous chunks whose sizes differ
    by at most one (the rollouts of a prompt stay together: prefix sharing). Over all ranks
    every pair appears exactly once.
    """  # fmt: skip
    pairs = [(i, k) for i in range(dp_rank, num_records, dp) for k in range(rollouts_per_prompt)]
    base, extra = divmod(len(pairs), cp)
    begin = cp_rank * base + min(cp_rank, extra)
    return pairs[begin : begin + base + (cp_rank < extra)]


def generate_groups(
    engine: RolloutEngine,
    records: list[RLRecord],
    *,
    tokenizer,
    rl: RLConfig,
    params: SamplingParams,
) -> list[list[Sample]]:
    """Rollouts for ``records`` (``rollouts_per_prompt`` each), scored; all ranks return the
    same global list of groups in record order. All ranks must call it (collective over
    DP x CP; TP ranks of a replica generate together)."""
    from megatron.core import parallel_state

    mine = replica_share(
        len(records),
        rollouts_per_prompt=rl.rollouts_per_prompt,
        dp=parallel_state.get_data_parallel_world_size(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        cp=parallel_state.get_context_parallel_world_size(),
        cp_rank=parallel_state.get_context_parallel_rank(),
    )
    max_prompt = rl.max_seq_length - rl.max_new_tokens
    encoded: dict[int, list[int]] = {}
    for index, _ in mine:
        if index not in encoded:
            encoded[index] = encode_prompt(records[index], tokenizer, max_prompt_tokens=max_prompt)
    prompts = [encoded[index] for index, _ in mine]
    # Called with no prompts too: an MoE engine at EP > 1 decodes in lockstep with the ranks
    # that have some (rl/rollout/native.py `_lockstep_group`).
    rollouts = engine.generate(prompts, params)
    think_prefix = generation_think_prefix(tokenizer)
    local = {
        pair: _score(rollout, records[pair[0]], tokenizer=tokenizer, rl=rl,
                     think_prefix=think_prefix)
        for pair, rollout in zip(mine, rollouts, strict=True)
    }  # fmt: skip
    gathered: list[dict] = [None] * parallel_state.get_data_parallel_world_size(  # type: ignore[list-item]
        with_context_parallel=True
    )
    dist.all_gather_object(
        gathered, local, group=parallel_state.get_data_parallel_group(with_context_parallel=True)
    )
    merged = {pair: sample for part in gathered for pair, sample in part.items()}
    expected = len(records) * rl.rollouts_per_prompt
    if len(merged) != expected:
        raise RuntimeError(f"gathered {len(merged)} rollouts for {expected} (prompts x rollouts)")
    return [[merged[(i, k)] for k in range(rl.rollouts_per_prompt)] for i in range(len(records))]


def collect_experience(
    engine: RolloutEngine,
    next_records: Callable[[int], list[RLRecord]],
    *,
    tokenizer,
    rl: RLConfig,
    params_for_round: Callable[[int], SamplingParams],
) -> StepExperience:
    """Generates rounds of prompts until ``rl.prompts_per_step`` groups pass the DAPO filter.

    ``next_records(n)`` returns the next ``n`` prompts of the data stream. Without dynamic
    sampling one round is used as it is. Advantages are filled in on the kept groups.
    """
    state = DynamicSamplingState(
        train_batch_size=rl.prompts_per_step,
        max_num_gen_batches=rl.max_num_gen_batches if rl.dynamic_sampling else 1,
        on_exhausted=rl.on_exhausted if rl.dynamic_sampling else "continue",
    )
    per_round = rl.prompts_per_step * (rl.gen_batch_multiplier if rl.dynamic_sampling else 1)
    consumed, round_index = 0, 0
    engine_start = engine.num_generated
    generated: list[Sample] = []
    while True:
        records = next_records(per_round)
        consumed += len(records)
        groups = generate_groups(engine, records, tokenizer=tokenizer, rl=rl,
                                 params=params_for_round(round_index))  # fmt: skip
        round_index += 1
        generated.extend(s for g in groups for s in g)
        rewards = torch.tensor([s.reward for g in groups for s in g], dtype=torch.float64)
        keep = (
            filter_groups(rewards, rl.rollouts_per_prompt)
            if rl.dynamic_sampling
            else [True] * len(groups)
        )
        if add_generation_batch(state, groups, keep):
            break
    num_rounds, seen = state.num_gen_batches, state.num_groups_seen
    kept = pop_train_batch(state)
    _fill_advantages(kept, rl=rl)
    return StepExperience(groups=kept, generated=generated, num_gen_batches=num_rounds,
                          num_groups_seen=seen, prompts_consumed=consumed,
                          num_engine_responses=_replicas_sum(engine.num_generated - engine_start))  # fmt: skip


def _replicas_sum(count: int) -> int:
    """``count`` summed over the DP x CP ranks (the generating replicas' shares)."""
    from megatron.core import parallel_state

    from megatron_longact.device import current_device

    total = torch.tensor([count], dtype=torch.int64, device=current_device())  # NCCL on GPU
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    return int(total.item())


def _fill_advantages(groups: list[list[Sample]], *, rl: RLConfig) -> None:
    if not groups:
        return
    rewards = torch.tensor([s.reward for g in groups for s in g], dtype=torch.float64)
    ids = torch.tensor([i for i, g in enumerate(groups) for _ in g])
    adv = group_advantages(rewards, ids, normalize_std=rl.normalize_adv_std,
                           leave_one_out=rl.leave_one_out)  # fmt: skip
    for sample, value in zip((s for g in groups for s in g), adv.tolist()):
        sample.advantage = value
