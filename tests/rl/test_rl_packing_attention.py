"""Packed THD rows through megatron's local attention at CP=1 (``PackedDotProductAttention``).

Packed RL rows go to attention as THD at every layout (``rl.step.step_layout``); at CP=1 on the
local spec megatron's kernel runs once per packed segment. Its output and the gradients of Q,
K and V must equal megatron's own attention over the whole row with the dense block-causal
mask (what packed rows used before), and dense rows must be megatron's forward bit for bit.
"""

from __future__ import annotations

import torch

from megatron_longact.runtime.launch import run_local

HEADS, GROUPS, DIM = 4, 2, 8
SEGMENTS = [5, 7, 1, 3]  # ragged, one single-token segment


def _world() -> dict:
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_longact.config.schema import ParallelConfig
    from megatron_longact.data.packing import block_causal_mask
    from megatron_longact.models.cp_attention import PackedDotProductAttention
    from megatron_longact.runtime.distributed import init_distributed

    init_distributed(ParallelConfig(), seed=0)
    config = TransformerConfig(num_layers=1, hidden_size=HEADS * DIM, num_attention_heads=HEADS,
                               num_query_groups=GROUPS, kv_channels=DIM, attention_dropout=0.0,
                               use_cpu_initialization=True)  # fmt: skip
    kwargs = dict(layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    packed = PackedDotProductAttention(config, **kwargs)
    megatron = DotProductAttention(config, **kwargs)
    cu = torch.tensor([0, *torch.tensor(SEGMENTS).cumsum(0).tolist()], dtype=torch.int32)
    total = int(cu[-1])
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(total, HEADS, DIM, generator=gen)
    k, v = (torch.randn(total, GROUPS, DIM, generator=gen) for _ in range(2))
    weight = torch.randn(total, HEADS * DIM, generator=gen)

    def run(module, *, thd: bool):
        inputs = [x.clone().requires_grad_() for x in (q, k, v)]
        if thd:
            params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                     max_seqlen_q=max(SEGMENTS), max_seqlen_kv=max(SEGMENTS))  # fmt: skip
            out = module(*inputs, None, packed_seq_params=params)
        else:  # one [T, 1, ...] row, block-causal mask [1, 1, T, T]
            mask = block_causal_mask(cu, total)[None]
            out = module(*(x.unsqueeze(1) for x in inputs), mask).squeeze(1)
        (out * weight).sum().backward()
        return [out.detach(), *(x.grad for x in inputs)]

    dense = [x.unsqueeze(1) for x in (q, k, v)]  # a causal [T, 1, ...] row, no mask
    return {
        "thd": run(packed, thd=True),
        "masked": run(megatron, thd=False),
        "dense_same": torch.equal(packed(*dense, None), megatron(*dense, None)),
    }


def test_packed_attention_equals_block_causal_mask_and_keeps_dense_rows():
    (res,) = run_local(_world, 1)
    for name, got, want in zip(("out", "dq", "dk", "dv"), res["thd"], res["masked"]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=name)
    assert res["dense_same"]
