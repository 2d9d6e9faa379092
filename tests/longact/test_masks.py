"""Eq. 10-11 masks in real training: grad mode, freeze mode (distributed and fp32 optimizers,
TP x DP equivalence), strategy none, static / every_n_steps schedules, EMA, checkpoints."""

from __future__ import annotations

import pytest
import torch
from equivalence import assert_params_close
from longact_helpers import LR, WEIGHT_DECAY, reference_saliency

from megatron_longact.longact.freeze import _row_pieces
from megatron_longact.longact.masks import jaccard, local_row_mask, row_mask
from megatron_longact.longact.selection import random_generator, select_dims
from megatron_longact.models.qkv_layout import QKVLayout


def test_row_masks_follow_the_layout():
    layout = QKVLayout(num_heads=4, num_groups=2, head_dim=2, tp_size=2)  # 16 rows, 8 per rank
    selection = {"q": torch.tensor([[True, False]] * 4), "k": torch.tensor([[False, True]] * 2)}
    rows = row_mask(layout, selection)
    # group 0 = rows q0 0-1, q1 2-3, k0 4-5, v0 6-7; group 1 = rows 8-15. V not targeted.
    assert rows.tolist() == [True, False, True, False, False, True, True, True] * 2
    assert torch.equal(local_row_mask(layout, selection, tp_rank=1), rows[8:])
    selection["v"] = torch.tensor([[False, True], [True, False]])
    rows = row_mask(layout, selection)
    assert rows[[6, 7, 14, 15]].tolist() == [False, True, True, False]


def test_row_pieces_cover_a_flat_range_row_aligned():
    assert _row_pieces(3, 17, 5) == [(0, 1, 0, 2), (1, 2, 2, 5), (3, 1, 12, 2)]
    assert _row_pieces(10, 20, 5) == [(2, 2, 0, 5)]
    assert _row_pieces(6, 8, 5) == [(1, 1, 0, 2)]


def test_jaccard():
    a = torch.tensor([True, True, False, False])
    assert jaccard(a, torch.tensor([True, False, True, False])) == pytest.approx(1 / 3)
    assert jaccard(a, a) == 1.0


def _frozen(layout, selection):
    return torch.cat([layout.rows(p)[~m].flatten() for p, m in selection.items()])


def _trained(layout, selection):
    return torch.cat([layout.rows(p)[m].flatten() for p, m in selection.items()])


def test_grad_mode_zeroes_masked_main_grad_before_the_optimizer(single):
    (grad,) = single["grad"]
    layout = grad["layout"]
    assert len(grad["main_grads"]) == 2  # the optimizer ran at both steps
    for step, (selection, main_grads) in enumerate(zip(grad["selection"], grad["main_grads"])):
        for layer, per_param in main_grads.items():
            trained = torch.ones(layout.num_rows, dtype=torch.bool)
            trained[_frozen(layout, selection[layer])] = False
            assert per_param["bias"] is not None  # the bias rows are masked too
            for name, main_grad in per_param.items():
                rows = main_grad.reshape(layout.num_rows, -1)
                where = f"step {step} layer {layer} {name}"
                # Exactly zero when the optimizer runs; every trainable row has a gradient.
                assert rows[~trained].abs().max() == 0, where
                assert rows[trained].abs().amax(dim=1).min() > 0, where
    # megatron clips on the masked gradients: its norm is theirs, not the dense one.
    assert len(grad["grad_norm"]) == len(grad["masked_norm"]) == len(grad["dense_norm"]) == 2
    for clipped, masked, dense in zip(grad["grad_norm"], grad["masked_norm"], grad["dense_norm"]):
        assert clipped == pytest.approx(masked, rel=1e-5)
        assert abs(masked - dense) > 1e-3 * dense
    assert grad["metrics"]["longact/q_trainable_frac"] == 0.25  # floor(0.3 * 8) / 8
    assert "longact/layer01/k_jaccard" in grad["metrics"]


def test_grad_mode_lets_weight_decay_move_masked_rows(single):
    # First step, zero gradient and zero Adam momentum: AdamW's update is pure decay.
    (grad,) = single["grad"]
    for layer, selection in grad["selection"][0].items():
        rows = _frozen(grad["layout"], selection)
        before, after = grad["before"][layer][rows], grad["after"][layer][rows]
        assert not torch.equal(before, after)
        torch.testing.assert_close(
            after, before * (1 - grad["lr"] * WEIGHT_DECAY), atol=1e-9, rtol=1e-6
        )


@pytest.mark.parametrize("run", ["freeze", "freeze_fp32_optimizer"])
def test_freeze_keeps_masked_rows_bitwise(single, run):
    (result,) = single[run]
    layout = result["layout"]
    v_rows = layout.rows("v").flatten()
    for number, step in enumerate(result["history"]):
        for layer, selection in step["selection"].items():
            before, after = step["before"][layer], step["after"][layer]
            frozen, trained = _frozen(layout, selection), _trained(layout, selection)
            where = f"step {number} layer {layer}"
            assert torch.equal(after[frozen], before[frozen]), where
            assert (after[trained] != before[trained]).any(dim=1).all(), where
            assert (after[v_rows] != before[v_rows]).any(dim=1).all(), where  # V trains densely


def test_freeze_keeps_adam_state_of_never_selected_rows_zero(single):
    (result,) = single["freeze"]
    layout = result["layout"]
    for layer, states in result["adam"].items():
        ever = torch.zeros(layout.num_rows, dtype=torch.bool)
        for step in result["history"]:
            ever[_trained(layout, step["selection"][layer])] = True
        ever[layout.rows("v").flatten()] = True
        assert (~ever).any()
        for name, state in states.items():
            assert state[~ever].abs().max() == 0, (layer, name)
            assert state[ever].abs().amax(dim=1).min() > 0, (layer, name)


@pytest.mark.parametrize("world", ["dp2", "tp2_dp2"])
def test_freeze_parallel_equals_single_process(request, single, world):
    (reference,) = single["freeze"]
    for rank, run in enumerate(request.getfixturevalue(world)["freeze"]):
        if world == "dp2":  # a DP shard of the distributed optimizer cuts a qkv row (hidden 40)
            width = run["history"][0]["before"][0].shape[1]
            assert any(start % width or end % width for start, end in run["shard_ranges"].values())
        for number, (step, ref_step) in enumerate(zip(run["history"], reference["history"])):
            for layer, selection in ref_step["selection"].items():
                where = f"rank {rank} step {number} layer {layer}"
                for projection, mask in selection.items():
                    assert torch.equal(step["selection"][layer][projection], mask), where
                frozen = _frozen(reference["layout"], selection)
                assert torch.equal(step["after"][layer][frozen], step["before"][layer][frozen]), (
                    where
                )
        assert_params_close(run["params"], reference["params"], lr=LR,
                            step=len(reference["history"]))  # fmt: skip


@pytest.mark.parametrize("run", ["none", "ratio_one"])
def test_strategy_none_and_full_ratio_reproduce_dense_bit_for_bit(single, run):
    (dense,), (result,) = single["dense"], single[run]
    assert result["losses"] == dense["losses"]
    for name, value in dense["params"].items():
        assert torch.equal(result["params"][name], value), name
    if run == "none":
        assert result["metrics"] == {}
    else:
        assert result["metrics"]["longact/q_trainable_frac"] == 1.0


def test_static_schedule_uses_the_profiled_file(single):
    (static,) = single["static"]
    assert static["num_samples"] == 4
    # Same initial weights, same batch as the padded saliency probe.
    reference = reference_saliency(single["padded"][0], packed=False)
    for layer, per_projection in static["loaded"].items():
        for projection, values in per_projection.items():
            torch.testing.assert_close(values, static["profile"][layer][projection])
            torch.testing.assert_close(values, reference[layer][projection], atol=2e-6, rtol=1e-5)
    for masks in static["selection"]:
        for layer, selection in masks.items():
            for projection, mask in selection.items():
                expected = select_dims(static["loaded"][layer][projection], ratio=0.3)
                assert torch.equal(mask, expected), (layer, projection)
    assert static["observed_is_plain"] == [True, True]  # nothing measured during training
    assert static["metrics"]["longact/q_jaccard"] == 1.0


def test_every_n_steps_with_ema_and_state_dict_round_trip(single):
    (run,) = single["every_n"]
    steps = run["steps"]
    for layer in (0, 1):
        for projection in ("q", "k"):
            first, second, third = (s["selection"][layer][projection] for s in steps)
            assert torch.equal(second, first)  # no refresh at step 1
            ema = (
                0.5 * steps[0]["saliency"][layer][projection]
                + 0.5 * steps[2]["saliency"][layer][projection]
            )
            torch.testing.assert_close(steps[2]["ema"][layer][projection], ema)
            assert torch.equal(third, select_dims(ema, ratio=0.3))
            assert torch.equal(run["after_resume"][layer][projection], third)
    assert steps[1]["metrics"]["longact/q_jaccard"] == 1.0
    assert not torch.equal(steps[2]["saliency"][0]["q"], steps[0]["saliency"][0]["q"])
    assert run["fresh_step"] == 0  # a checkpoint without LongAct state: stays fresh
    saved, reloaded = run["saved"], run["reloaded"]
    assert saved["step"] == reloaded["step"] == 3
    for key in ("saliency", "ema", "masks"):
        for layer, per_projection in saved[key].items():
            for projection, value in per_projection.items():
                assert torch.equal(reloaded[key][layer][projection], value), (key, layer)


def test_random_strategy_draws_seeded_masks_per_step_without_measuring(single):
    (run,) = single["random"]
    assert run["observed_is_plain"] == [True, True]
    for step, masks in enumerate(run["selection"]):
        assert sorted(masks[0]) == ["k", "q", "v"]
        for layer, selection in masks.items():
            for projection, mask in selection.items():
                generator = random_generator(5, step=step, layer=layer, projection=projection)
                expected = select_dims(
                    torch.zeros(mask.shape), ratio=0.3, strategy="random", generator=generator
                )
                assert torch.equal(mask, expected), (step, layer, projection)
    assert not torch.equal(run["selection"][0][0]["q"], run["selection"][1][0]["q"])


def test_saliency_histograms_reach_tensorboard(single):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(single["every_n"][0]["tb_dir"], size_guidance={"histograms": 0})
    events.Reload()
    tags = events.Tags()["histograms"]
    assert {f"longact/saliency/layer{n:02d}/{p}" for n in (0, 1) for p in "qkv"} <= set(tags)
    histogram = events.Histograms("longact/saliency/layer00/q")[0]
    assert histogram.step == 3 and histogram.histogram_value.num == 4 * 16
