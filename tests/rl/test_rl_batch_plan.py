"""Which samples go together in an RL step (``rl.batch.plan_step``) and the packed layout.

Pure functions: no distributed setup. The plan depends on unpadded lengths and DP only, so it
is identical on every rank, at every TP/CP/PP layout and on resume.
"""

from __future__ import annotations

import random

import pytest
import torch

from megatron_longact.rl.batch import make_rows, pack_rows, packed_length, plan_step, row_layout
from megatron_longact.rl.experience import Sample
from megatron_longact.runtime.batches import balanced_partition


def _skewed(n: int = 64, seed: int = 0) -> list[int]:
    """A long-context mix: most sequences short, a few near the budget."""
    rng = random.Random(seed)
    return [rng.choice([rng.randint(200, 800), rng.randint(3000, 8000)]) for _ in range(n)]


def _flatten(plan) -> list[int]:
    return sorted(i for update in plan.updates for rank in update for g in rank for i in g)


@pytest.mark.parametrize("dp", [2, 3, 8])
def test_dp_balance_within_one_sequence(dp):
    lengths = _skewed()
    sets = balanced_partition([float(n) for n in lengths], parts=dp)
    totals = [sum(lengths[i] for i in s) for s in sets]
    assert max(totals) - min(totals) <= max(lengths)
    # Contiguous slices of the same mix are far worse (the layout before balancing).
    plan = plan_step(lengths, dp=dp, balance="tokens")
    naive = plan_step(lengths, dp=dp, balance="none")
    assert plan.imbalance < naive.imbalance


def test_plan_is_a_pure_function_of_lengths():
    lengths = _skewed(seed=3)
    kwargs = dict(dp=4, num_minibatches=2, max_tokens_per_microbatch=9000, balance="attention")
    assert plan_step(lengths, **kwargs) == plan_step(list(lengths), **kwargs)


@pytest.mark.parametrize("budget", [0, 5000, 9000])
@pytest.mark.parametrize("num_samples,dp,minibatches", [(64, 4, 2), (11, 4, 1), (1, 2, 1)])
def test_nothing_dropped_and_same_count_on_every_rank(budget, num_samples, dp, minibatches):
    lengths = _skewed(num_samples, seed=num_samples)
    plan = plan_step(lengths, dp=dp, num_minibatches=minibatches, micro_batch_size=3,
                     max_tokens_per_microbatch=budget)  # fmt: skip
    assert _flatten(plan) == list(range(num_samples))  # every sample exactly once
    for update in plan.updates:
        assert len({len(rank) for rank in update}) == 1  # same micro-batch count per rank


def test_token_budget_is_kept_and_oversize_stands_alone():
    lengths = [*_skewed(40, seed=1), 12_000]  # one sequence above the budget
    plan = plan_step(lengths, dp=2, max_tokens_per_microbatch=9000)
    assert plan.num_oversize == 1
    for rank in plan.updates[0]:
        for group in rank:
            tokens = sum(lengths[i] for i in group)
            assert tokens <= 9000 or group == [len(lengths) - 1]


def test_partial_batch_smaller_than_dp_gets_empty_micro_batches():
    plan = plan_step([30], dp=2, micro_batch_size=4)
    assert plan.updates[0] == [[[0]], [[]]]  # rank 1 runs one empty micro-batch


def _sample(prompt: int, response: int, offset: int) -> Sample:
    ids = list(range(offset, offset + prompt + response))
    return Sample(prompt_ids=ids[:prompt], response_ids=ids[prompt:],
                  engine_logprobs=[-0.5] * response, reward=1.0, format_ok=True, answer_ok=True,
                  truncated=False, advantage=0.7)  # fmt: skip


def test_packed_row_matches_padded_rows_per_sequence():
    samples = [_sample(5, 3, 10), _sample(2, 6, 100), _sample(7, 1, 200)]
    layout = row_layout(packed=True, thd=True, cp=2, tp=1, sequence_parallel=False)
    packed = pack_rows(samples, layout=layout, pad_token_id=0)
    padded = make_rows(samples, length=16, pad_token_id=0)
    # Each sequence padded to 2 x CP = 4: 8, 8, 8 -> 24, the row to 8 x CP = 16 -> 32.
    assert packed["cu_seqlens"].tolist() == [0, 8, 16, 24, 32]
    assert packed["tokens"].shape == (1, packed_length(samples, layout)) == (1, 32)
    for i, start in enumerate([0, 8, 16]):
        for key in ("tokens", "labels", "response_mask", "advantages", "engine_logp",
                    "token_mask"):  # fmt: skip
            torch.testing.assert_close(packed[key][0, start : start + 8], padded[key][i, :8])
        assert (packed["sequence_ids"][0, start : start + 8] == i).all()
    torch.testing.assert_close(packed["seq_tokens"], padded["seq_tokens"])
    # Labels never cross a boundary: the last real token of a sequence predicts padding.
    assert packed["labels"][0, 7] == 0 and packed["response_mask"][0, 7] == 0


def test_padded_layout_without_sp_keeps_the_old_row_length():
    layout = row_layout(packed=False, thd=False, cp=1, tp=2, sequence_parallel=False)
    assert layout.row_multiple == 8 and layout.sequence_multiple == 1
    assert row_layout(packed=True, thd=False, cp=2, tp=4, sequence_parallel=True).row_multiple == 16
