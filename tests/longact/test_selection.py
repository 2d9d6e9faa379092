"""Eq. 9 selection, the schedules and the EMA: pure functions, no processes."""

from __future__ import annotations

import pytest
import torch

from megatron_longact.longact.masks import row_mask
from megatron_longact.longact.schedule import ema_update, refreshes_at
from megatron_longact.longact.selection import num_selected, random_generator, select_dims
from megatron_longact.models.qkv_layout import QKVLayout


def test_appendix_a_example_selects_rows_2_and_5():
    # H = 2, D = 4, lambda = 0.3 -> k = 1; M_0 -> dim 2, M_1 -> dim 1 -> rows {2, 5}.
    saliency = torch.tensor([[0.8, 0.2, 0.9, 0.5], [0.3, 0.7, 0.6, 0.4]])
    mask = select_dims(saliency, ratio=0.3)
    assert num_selected(0.3, 4) == 1
    assert mask.flatten().nonzero().flatten().tolist() == [2, 5]
    # The same through the fused layout of a model whose W_Q is exactly these 8 rows
    # (Eq. 8: one query group holding both heads puts q(h, d) at h * D + d).
    layout = QKVLayout(num_heads=2, num_groups=1, head_dim=4)
    rows = row_mask(layout, {"q": mask, "k": torch.ones(1, 4, dtype=torch.bool)})
    assert (~rows).nonzero().flatten().tolist() == [0, 1, 3, 4, 6, 7]


def test_massive_and_min_pick_top_and_bottom_k_per_head():
    saliency = torch.tensor([[5.0, 1.0, 4.0, 2.0, 3.0, 0.0, 9.0, 8.0, 7.0, 6.0]] * 2)
    saliency[1] = saliency[1].flip(0)
    top = select_dims(saliency, ratio=0.3, strategy="massive")  # k = 3
    bottom = select_dims(saliency, ratio=0.3, strategy="min")
    assert top[0].nonzero().flatten().tolist() == [6, 7, 8]
    assert top[1].nonzero().flatten().tolist() == [1, 2, 3]
    assert bottom[0].nonzero().flatten().tolist() == [1, 3, 5]
    assert top.sum(dim=1).tolist() == [3, 3] and bottom.sum(dim=1).tolist() == [3, 3]


def test_ties_break_to_lower_index_and_none_is_dense():
    saliency = torch.ones(3, 8)
    assert select_dims(saliency, ratio=0.25).nonzero()[:, 1].tolist() == [0, 1] * 3
    assert select_dims(saliency, ratio=0.25, strategy="none").all()


def test_global_scope_ranks_all_heads_together():
    saliency = torch.tensor([[10.0, 9.0, 8.0, 7.0], [1.0, 2.0, 3.0, 4.0]])
    mask = select_dims(saliency, ratio=0.5, scope="global")  # floor(0.5 * 8) = 4
    assert mask[0].all() and not mask[1].any()
    assert select_dims(saliency, ratio=0.5).sum(dim=1).tolist() == [2, 2]


def test_random_is_seeded_per_step_layer_projection():
    def draw(seed, step, layer, projection):
        gen = random_generator(seed, step=step, layer=layer, projection=projection)
        return select_dims(torch.zeros(4, 16), ratio=0.3, strategy="random", generator=gen)

    first = draw(0, 3, 1, "q")
    assert torch.equal(first, draw(0, 3, 1, "q"))  # what every rank computes
    assert first.sum(dim=1).tolist() == [4, 4, 4, 4]
    others = [draw(1, 3, 1, "q"), draw(0, 4, 1, "q"), draw(0, 3, 2, "q"), draw(0, 3, 1, "k")]
    assert all(not torch.equal(first, other) for other in others)


def test_num_selected_floor_and_errors():
    assert num_selected(0.3, 128) == 38
    assert num_selected(0.29, 100) == 29  # 0.29 * 100 = 28.999999999999996 in floats
    assert num_selected(1.0, 7) == 7
    with pytest.raises(ValueError, match="raise the ratio"):
        num_selected(0.1, 4)
    with pytest.raises(ValueError, match="strategy"):
        select_dims(torch.ones(2, 4), ratio=0.5, strategy="top")


def test_refresh_schedules():
    assert all(refreshes_at("dynamic", step=s) for s in range(5))
    assert [refreshes_at("every_n_steps", step=s, every_n_steps=3) for s in range(7)] == [
        True,
        False,
        False,
        True,
        False,
        False,
        True,
    ]
    assert not any(refreshes_at("static", step=s) for s in range(3))
    with pytest.raises(ValueError, match="schedule"):
        refreshes_at("weekly", step=0)


def test_ema_update():
    first = ema_update(None, torch.tensor([2.0, 4.0]), decay=0.9)
    assert first.tolist() == [2.0, 4.0]
    second = ema_update(first, torch.tensor([12.0, 4.0]), decay=0.9)
    torch.testing.assert_close(second, torch.tensor([3.0, 4.0]))
    assert ema_update(first, torch.tensor([7.0, 7.0]), decay=0.0).tolist() == [7.0, 7.0]
