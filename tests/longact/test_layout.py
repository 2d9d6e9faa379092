"""Fused-QKV row layout: the formula, and agreement with megatron's own split."""

from __future__ import annotations

import pytest
import torch
from longact_worlds import LAYOUT_ARCHS

from megatron_longact.models.qkv_layout import QKVLayout


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


@pytest.mark.parametrize("arch", LAYOUT_ARCHS)
@pytest.mark.parametrize("world,tp", [("single", 1), ("tp2_dp2", 2)])
def test_formula_matches_megatron_split(request, world, tp, arch):
    for observed in request.getfixturevalue(world)[f"layout_{arch}"]:
        layout, rank = observed["layout"], observed["tp_rank"]
        assert layout.tp_size == tp
        heads = layout.num_heads // tp
        if layout.num_groups >= tp:
            groups = layout.num_groups // tp
            kv = slice(rank * groups, (rank + 1) * groups)
        else:  # TP ranks share a group
            group = rank // (tp // layout.num_groups)
            kv = slice(group, group + 1)
        # The formula's rows of the full output ([s, b, heads, D]), this rank's heads / groups;
        # q / k through the layer's layernorms, as megatron's split applies them.
        expected = {
            "query": observed["q_normed"][..., layout.rows("q")][:, :, rank * heads : (rank + 1) * heads],
            "key": observed["k_normed"][..., layout.rows("k")][:, :, kv],
            "value": observed["full"][..., layout.rows("v")][:, :, kv],
            "local": observed["full"][..., layout.local_rows(rank)],
        }  # fmt: skip
        torch.testing.assert_close({name: observed[name] for name in expected}, expected,
                                   rtol=0, atol=0, msg=lambda m, rank=rank: f"TP rank {rank}: {m}")  # fmt: skip
        assert observed["query"].shape[2] == 4 // tp  # each TP rank computes its query heads


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
