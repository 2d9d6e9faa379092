"""The local context-parallel core attention (``models/cp_attention.py``) on gloo, CP=2.

Each rank holds megatron's zig-zag chunks of a sequence; its output and the gradients of its
own Q, K and V must equal full (unsplit) causal attention restricted to those tokens: dense
rows with GQA, and packed THD rows whose segments restart the causal mask.
"""

from __future__ import annotations

import pytest
import torch

from megatron_longact.models.cp_layout import cp_gather_order, cp_token_index
from megatron_longact.runtime.launch import run_local

HEADS, GROUPS, DIM = 4, 2, 8
SEQ, BATCH = 16, 2
THD_SEGMENTS = [8, 4, 12, 8]  # multiples of 2 x CP = 4


def _inputs(total: int, batch: int, *, seed: int):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(total, batch, HEADS, DIM, generator=gen)
    k = torch.randn(total, batch, GROUPS, DIM, generator=gen)
    v = torch.randn(total, batch, GROUPS, DIM, generator=gen)
    weight = torch.randn(total, batch, HEADS * DIM, generator=gen)
    return q, k, v, weight


def _reference(q, k, v, weight, boundaries):
    """Full attention with autograd: output and grads, global order."""
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    total = q.shape[0]
    pos = torch.arange(total)
    seg = torch.bucketize(pos, boundaries[1:-1], right=True)
    allowed = (pos[None, :] <= pos[:, None]) & (seg[None, :] == seg[:, None])
    kk = k.repeat_interleave(HEADS // GROUPS, dim=2)
    vv = v.repeat_interleave(HEADS // GROUPS, dim=2)
    scores = torch.einsum("qbhd,kbhd->bhqk", q, kk) / DIM**0.5
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    out = torch.einsum("bhqk,kbhd->qbhd", probs, vv).reshape(total, q.shape[1], -1)
    (out * weight).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def _config(cp: int):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=1,
        hidden_size=HEADS * DIM,
        num_attention_heads=HEADS,
        num_query_groups=GROUPS,
        kv_channels=DIM,
        context_parallel_size=cp,
        attention_dropout=0.0,
        use_cpu_initialization=True,
    )


def _cp_world(thd: bool, dtype: torch.dtype):
    from megatron.core import parallel_state
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_longact.config.schema import ParallelConfig
    from megatron_longact.models.cp_attention import (
        ContextParallelAttention,
        local_attention_only,
    )
    from megatron_longact.runtime.distributed import init_distributed

    dims = init_distributed(ParallelConfig(context_parallel_size=2), seed=0)
    cp, rank = 2, parallel_state.get_context_parallel_rank()
    if thd:
        bounds = torch.tensor([0, *torch.tensor(THD_SEGMENTS).cumsum(0).tolist()])
        total, batch = sum(THD_SEGMENTS), 1
    else:
        bounds, total, batch = torch.tensor([0, SEQ]), SEQ, BATCH
    q, k, v, weight = _inputs(total, batch, seed=3)
    ref = _reference(q, k, v, weight, bounds)
    index = cp_token_index(bounds, cp_size=cp, cp_rank=rank)
    local = [x[index].to(dtype).requires_grad_() for x in (q, k, v)]
    attention = ContextParallelAttention(
        _config(cp), layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self"
    )
    params = None
    args = local
    if thd:
        cu = bounds.to(torch.int32)
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                 cu_seqlens_q_padded=cu, cu_seqlens_kv_padded=cu,
                                 max_seqlen_q=12, max_seqlen_kv=12)  # fmt: skip
        args = [x.squeeze(1) for x in local]
    out = attention(*args, None, packed_seq_params=params)
    out = out.view(len(index), batch, -1)
    (out.float() * weight[index]).sum().backward()
    # Local-only mode: no collectives, plain causal attention over the local tensors.
    with local_attention_only():
        alone = attention(*(x.detach() for x in local), None)
    return {
        "rank": dims.cp_rank,
        "index": index,
        "out": out.detach().float(),
        "grads": [x.grad.float() for x in local],
        "ref": ref,
        "local_only": alone.float(),
        "order": cp_gather_order(bounds, cp_size=cp),
    }


@pytest.mark.parametrize("thd", [False, True], ids=["dense", "thd"])
def test_cp_attention_matches_full_attention(thd):
    results = run_local(_cp_world, 2, thd, torch.float32)
    order = torch.cat([r["index"] for r in sorted(results, key=lambda r: r["rank"])])
    assert torch.equal(order, results[0]["order"])
    assert torch.equal(order.sort().values, torch.arange(order.numel()))  # a partition
    for res in results:
        index = res["index"]
        out, dq, dk, dv = res["ref"]
        torch.testing.assert_close(res["out"], out[index], atol=1e-5, rtol=1e-5)
        for got, want in zip(res["grads"], (dq, dk, dv)):
            torch.testing.assert_close(got.view_as(want[index]), want[index], atol=1e-5,
                                       rtol=1e-5)  # fmt: skip
    # Outside CP the same module is causal attention over whatever it is given.
    res = results[0]
    q, k, v, weight = _inputs(res["ref"][0].shape[0], 1 if thd else BATCH, seed=3)
    local = [x[res["index"]] for x in (q, k, v)]
    alone = _reference(*local, weight[res["index"]], torch.tensor([0, len(res["index"])]))[0]
    torch.testing.assert_close(res["local_only"].view_as(alone), alone, atol=1e-5, rtol=1e-5)


def test_cp_attention_bf16_close_to_fp32():
    results = run_local(_cp_world, 2, False, torch.bfloat16)
    for res in results:
        out = res["ref"][0][res["index"]]
        torch.testing.assert_close(res["out"], out, atol=3e-2, rtol=3e-2)


def test_token_index_is_megatron_layout():
    from megatron.core.utils import get_batch_on_this_cp_rank  # noqa: F401 (documented twin)

    full = torch.arange(16)
    for rank in range(2):
        chunks = full.view(4, 4)
        expected = torch.cat([chunks[rank], chunks[3 - rank]])
        assert torch.equal(cp_token_index(torch.tensor([0, 16]), cp_size=2, cp_rank=rank),
                           expected)  # fmt: skip
    # Per segment for THD: [0, 8) and [8, 12) on CP=2.
    got = cp_token_index(torch.tensor([0, 8, 12]), cp_size=2, cp_rank=1)
    assert got.tolist() == [2, 3, 4, 5, 9, 10]
    with pytest.raises(ValueError, match="multiples of 2 x"):
        cp_token_index(torch.tensor([0, 6, 12]), cp_size=2, cp_rank=0)
