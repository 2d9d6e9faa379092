"""Fused-QKV row layout: the formula, and agreement with megatron's own split."""

from __future__ import annotations

import pytest
import torch

from megatron_longact.models.qkv_layout import QKVLayout

ARCHS = ("gqa", "mha_bias", "one_group")


@pytest.mark.parametrize("heads,groups,dim,tp", [(8, 2, 4, 1), (8, 8, 4, 2), (4, 1, 16, 2)])
def test_rows_partition_the_fused_projection(heads, groups, dim, tp):
    layout = QKVLayout(num_heads=heads, num_groups=groups, head_dim=dim, tp_size=tp)
    rows = torch.cat([layout.rows(p).flatten() for p in ("q", "k", "v")])
    assert sorted(rows.tolist()) == list(range(layout.num_rows))
    n, block = heads // groups, (heads // groups + 2) * dim
    for h in range(heads):
        for d in range(dim):
            assert (
                layout.rows("q")[h, d] == layout.q_row(h, d) == (h // n) * block + (h % n) * dim + d
            )
    for g in range(groups):
        assert layout.rows("k")[g, 0] == layout.k_row(g, 0) == g * block + n * dim
        assert (
            layout.rows("v")[g, dim - 1]
            == layout.v_row(g, dim - 1)
            == g * block + (n + 1) * dim + dim - 1
        )
    blocks = [range(layout.num_rows)[layout.local_rows(r)] for r in range(tp)]
    assert [len(b) for b in blocks] == [layout.rows_per_rank] * tp
    values = torch.arange(layout.num_rows, dtype=torch.float32)
    split = layout.per_head(values)
    assert torch.equal(layout.per_row(split, fill=-1.0), values)


def test_layout_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple"):
        QKVLayout(num_heads=6, num_groups=4, head_dim=8)
    with pytest.raises(ValueError, match="tensor parallel"):
        QKVLayout(num_heads=3, num_groups=3, head_dim=3, tp_size=2)


def test_formula_matches_megatron_split_tp1(single):
    for arch in ARCHS:
        errors = single.saliency.layout[arch]
        assert errors.q == errors.k == errors.v == errors.local_rows == 0.0, arch


def test_formula_matches_megatron_split_tp2(tp2_dp2):
    for rank_result in tp2_dp2:
        for arch in ARCHS:
            errors = rank_result.saliency.layout[arch]
            assert errors.q == errors.k == errors.v == errors.local_rows == 0.0
            assert errors.q_shape[2] == 2  # each TP rank computes 2 of the 4 query heads


@pytest.mark.parametrize("heads,groups,dim", [(8, 2, 4), (8, 8, 4), (4, 1, 16), (9, 3, 8)])
def test_converter_fuse_and_longact_rows_are_one_layout(heads, groups, dim):
    # The converter (fuse/unfuse of HF weights) and LongAct (row indices of (head, dim)) read
    # the same QKVLayout: HF's q_proj row h*D+d must land on the row LongAct masks for (h, d).
    layout = QKVLayout(num_heads=heads, num_groups=groups, head_dim=dim)
    q = torch.randn(heads * dim, 3)
    k, v = torch.randn(groups * dim, 3), torch.randn(groups * dim, 3)
    fused = layout.fuse(q, k, v)
    for projection, weight in zip(("q", "k", "v"), (q, k, v)):
        assert torch.equal(fused[layout.rows(projection).flatten()], weight)
    per_head = layout.per_head(fused)
    assert torch.equal(per_head["q"], q.reshape(heads, dim, 3))
    assert torch.equal(per_head["k"], k.reshape(groups, dim, 3))
