"""DAPO dynamic sampling accounting, overlong shaping and filtering."""

import pytest
import torch

from megatron_longact.rl.sampling import (
    DynamicSamplingState,
    add_generation_batch,
    filter_groups,
    overlong_filter_mask,
    overlong_penalty,
    pop_train_batch,
    truncated_responses,
)


def test_filter_groups():
    # groups of 3: [1,0,1] mixed -> keep; [1,1,1] all right -> drop; [0,0,0] -> drop;
    # [0.1, 0.1, 0.1] equal floats (a float std could be 1e-17 here) -> drop.
    metric = [1, 0, 1, 1, 1, 1, 0, 0, 0, 0.1, 0.1, 0.1]
    assert filter_groups(metric, 3).tolist() == [True, False, False, False]
    assert filter_groups(torch.tensor([2.0, 2.0, 2.5, 2.0]), 2).tolist() == [False, True]
    # A group of one is always kept.
    assert filter_groups([1.0, 1.0], 1).tolist() == [True, True]
    with pytest.raises(ValueError, match="divide"):
        filter_groups([1.0, 0.0, 1.0], 2)


def test_accumulate_until_full_then_truncate():
    state = DynamicSamplingState(train_batch_size=4, max_num_gen_batches=10)
    # Batch 1: 5 groups, 2 kept.
    assert not add_generation_batch(state, ["a", "b", "c", "d", "e"], [1, 0, 0, 1, 0])
    assert state.kept == ["a", "d"] and state.num_gen_batches == 1
    # Batch 2: 3 more kept -> 5 >= 4: ready; the surplus "h" is dropped.
    keep = torch.tensor([True, True, False, True])
    assert add_generation_batch(state, ["f", "g", "x", "h"], keep)
    assert (state.num_gen_batches, state.num_groups_seen) == (2, 9)
    assert pop_train_batch(state) == ["a", "d", "f", "g"]
    # The state starts fresh for the next step.
    assert (state.kept, state.num_gen_batches, state.num_groups_seen) == ([], 0, 0)


def test_exhaustion_raises_after_max_batches():
    state = DynamicSamplingState(train_batch_size=3, max_num_gen_batches=2)
    assert not add_generation_batch(state, ["a", "b"], [1, 0])
    with pytest.raises(RuntimeError, match="kept 1 of 3 prompt groups after 2 generation"):
        add_generation_batch(state, ["c", "d"], [0, 0])


def test_exhaustion_continue_trains_on_what_it_has():
    state = DynamicSamplingState(train_batch_size=3, max_num_gen_batches=2, on_exhausted="continue")
    assert not add_generation_batch(state, ["a", "b"], [1, 0])
    assert add_generation_batch(state, ["c", "d"], [0, 1])
    assert state.exhausted
    assert pop_train_batch(state) == ["a", "d"]
    assert not state.exhausted


def test_unbounded_never_gives_up():
    state = DynamicSamplingState(train_batch_size=1, max_num_gen_batches=0)
    for _ in range(50):
        assert not add_generation_batch(state, ["x"], [False])
    assert add_generation_batch(state, ["y"], [True])
    assert pop_train_batch(state) == ["y"]


def test_state_validation():
    with pytest.raises(ValueError, match="train_batch_size"):
        DynamicSamplingState(train_batch_size=0)
    with pytest.raises(ValueError, match="on_exhausted"):
        DynamicSamplingState(train_batch_size=1, on_exhausted="skip")
    state = DynamicSamplingState(train_batch_size=1)
    with pytest.raises(ValueError, match="keep flags"):
        add_generation_batch(state, ["a", "b"], [True])


def test_overlong_penalty_values():
    # L_max 20, L_buf 8: penalty-free up to 12 tokens, then -(len - 12) / 8 * factor.
    lengths = torch.tensor([5, 12, 13, 16, 20])
    got = overlong_penalty(lengths, max_response_length=20, buffer_length=8)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, -0.125, -0.5, -1.0]))
    half = overlong_penalty(lengths, max_response_length=20, buffer_length=8, penalty_factor=0.5)
    torch.testing.assert_close(half, torch.tensor([0.0, 0.0, -0.0625, -0.25, -0.5]))
    with pytest.raises(ValueError, match="buffer_length"):
        overlong_penalty(lengths, max_response_length=20, buffer_length=0)
    with pytest.raises(ValueError, match="buffer_length"):
        overlong_penalty(lengths, max_response_length=20, buffer_length=21)


def test_overlong_filtering():
    lengths = torch.tensor([3, 4, 4])
    # Length 4 = L_max: truncated unless it ended with EOS.
    assert truncated_responses(lengths, max_response_length=4).tolist() == [False, True, True]
    eos = torch.tensor([True, True, False])
    truncated = truncated_responses(lengths, max_response_length=4, eos_emitted=eos)
    assert truncated.tolist() == [False, False, True]
    mask = torch.ones(3, 4)
    expected = torch.tensor([[1.0] * 4, [1.0] * 4, [0.0] * 4])
    torch.testing.assert_close(overlong_filter_mask(mask, truncated), expected)
    bool_mask = overlong_filter_mask(mask.bool(), truncated)
    assert bool_mask.dtype == torch.bool and bool_mask.sum().item() == 8
