"""Context-parallel batch slicing on real CP process groups (gloo, CP=2).

The CP model itself needs Transformer Engine (GPU); this checks the data side: each rank gets
chunks r and 2*CP-1-r of every [b, s] field, and gathering log-probs back restores the order.
"""

from __future__ import annotations

import torch

from megatron_longact.data.chat import TokenizedSample
from megatron_longact.runtime.launch import run_local
from megatron_longact.sft.data import pad_to_multiple


def _slice_and_gather():
    from megatron_longact.config.schema import ParallelConfig
    from megatron_longact.runtime.context_parallel import gather_dense_sequence, slice_dense_batch
    from megatron_longact.runtime.distributed import init_distributed

    dims = init_distributed(ParallelConfig(context_parallel_size=2), seed=0)
    tokens = torch.arange(2 * 16).view(2, 16)
    batch = {"tokens": tokens.clone(), "old_logp": tokens.float() / 10,
             "cu_seqlens": torch.tensor([0, 16, 32])}  # fmt: skip
    local = slice_dense_batch(batch)
    return {
        "cp_rank": dims.cp_rank,
        "tokens": local["tokens"],
        "cu_seqlens": local["cu_seqlens"],
        "gathered": gather_dense_sequence(local["old_logp"]),
    }


def test_zigzag_chunks_and_gather_round_trip():
    results = run_local(_slice_and_gather, 2)
    full = torch.arange(2 * 16).view(2, 16)
    chunks = full.view(2, 4, 4)
    for res in results:
        r = res["cp_rank"]
        expected = torch.cat([chunks[:, r], chunks[:, 3 - r]], dim=1)
        assert torch.equal(res["tokens"], expected)
        assert torch.equal(res["cu_seqlens"], torch.tensor([0, 16, 32]))  # metadata untouched
        assert torch.equal(res["gathered"], full.float() / 10)


def test_samples_padded_to_cp_multiple_without_loss():
    sample = TokenizedSample(input_ids=[5, 6, 7, 8, 9], loss_mask=[0, 0, 1, 1, 1])
    padded = pad_to_multiple(sample, 4, pad_token_id=0)
    assert padded.input_ids == [5, 6, 7, 8, 9, 0, 0, 0]
    assert padded.loss_mask == [0, 0, 1, 1, 1, 0, 0, 0]
    assert pad_to_multiple(padded, 4, pad_token_id=0) is padded
