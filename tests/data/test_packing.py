import random

import pytest
import torch
import torch.nn.functional as F

from megatron_longact.data.chat import TokenizedSample
from megatron_longact.data.packing import (
    block_causal_mask,
    collate,
    fill_bin,
    first_fit_decreasing,
    pack_samples,
    unpacked_batch,
)

PAD = 0


def _random_samples(num: int, *, seed: int, max_len: int) -> list[TokenizedSample]:
    rng = random.Random(seed)
    samples = []
    for _ in range(num):
        n = rng.randint(1, max_len)
        ids = [rng.randint(1, 99) for _ in range(n)]
        mask = [rng.randint(0, 1) for _ in range(n)]
        samples.append(TokenizedSample(input_ids=ids, loss_mask=mask))
    return samples


def test_first_fit_decreasing_known_layout():
    # Longest first: 6->bin0, 5->bin1, 4->bin2, 3->bin1 (5+3=8), 2->bin0 (6+2=8).
    assert first_fit_decreasing([5, 3, 4, 2, 6], capacity=8) == [[3, 4], [0, 1], [2]]
    with pytest.raises(ValueError, match="sample 1 has 9 tokens"):
        first_fit_decreasing([3, 9], capacity=8)


def test_fill_bin_layout_matches_module_docstring():
    a = TokenizedSample(input_ids=[11, 12, 13], loss_mask=[0, 1, 1])
    b = TokenizedSample(input_ids=[21, 22], loss_mask=[0, 1])
    packed = fill_bin([a, b], seq_length=7, pad_token_id=PAD)
    assert packed.tokens.tolist() == [11, 12, 13, 21, 22, PAD, PAD]
    assert packed.labels.tolist() == [12, 13, PAD, 22, PAD, PAD, PAD]
    assert packed.loss_mask.tolist() == [1, 1, 0, 1, 0, 0, 0]
    assert packed.position_ids.tolist() == [0, 1, 2, 0, 1, 0, 1]
    assert packed.cu_seqlens.tolist() == [0, 3, 5, 7]
    assert packed.tokens.dtype == packed.labels.dtype == torch.int64
    assert packed.loss_mask.dtype == torch.float32 and packed.cu_seqlens.dtype == torch.int32
    # A full bin has no padding segment.
    assert fill_bin([a, b], seq_length=5).cu_seqlens.tolist() == [0, 3, 5]


def test_packed_bins_hold_every_sample_exactly_and_never_cross_boundaries():
    samples = _random_samples(60, seed=0, max_len=40)
    seq_length = 64
    bins = pack_samples(samples, seq_length=seq_length, pad_token_id=PAD)
    assert sorted(i for b in bins for i in b.sample_indices) == list(range(len(samples)))
    for packed in bins:
        cu = packed.cu_seqlens.tolist()
        assert cu[0] == 0 and cu[-1] == seq_length
        for j, index in enumerate(packed.sample_indices):
            start, end = cu[j], cu[j + 1]
            sample = samples[index]
            assert end - start == sample.num_tokens
            assert packed.tokens[start:end].tolist() == sample.input_ids
            assert packed.labels[start:end].tolist() == sample.input_ids[1:] + [PAD]
            assert packed.loss_mask[start:end].tolist() == sample.loss_mask[1:] + [0]
            assert packed.position_ids[start:end].tolist() == list(range(sample.num_tokens))
        used = cu[packed.num_samples]
        assert packed.loss_mask[used:].sum() == 0 and (packed.tokens[used:] == PAD).all()
        # No target crosses a boundary: the last token of every segment is never trained.
        assert packed.loss_mask[torch.tensor(cu[1:]) - 1].sum() == 0
    # Packing is dense: FFD leaves less than one bin of slack overall here.
    total = sum(s.num_tokens for s in samples)
    assert len(bins) * seq_length - total < seq_length


def test_block_causal_mask_matches_definition():
    cu = torch.tensor([0, 3, 5, 8], dtype=torch.int32)
    mask = block_causal_mask(cu, 8)
    assert mask.shape == (1, 8, 8) and mask.dtype == torch.bool
    segment = [0, 0, 0, 1, 1, 2, 2, 2]
    for q in range(8):
        for k in range(8):
            may_attend = segment[q] == segment[k] and k <= q
            assert mask[0, q, k].item() == (not may_attend), (q, k)
    assert not mask.all(dim=-1).any()  # every query sees at least itself
    with pytest.raises(ValueError, match="include the padding segment"):
        block_causal_mask(torch.tensor([0, 3, 5]), 8)


def test_masked_attention_on_a_packed_row_equals_per_sample_attention():
    torch.manual_seed(0)
    samples = _random_samples(6, seed=1, max_len=12)
    packed = fill_bin(samples, seq_length=sum(s.num_tokens for s in samples) + 3)
    seq_length, dim = packed.seq_length, 8
    q, k, v = torch.randn(3, 1, seq_length, dim).unbind(0)
    # SDPA's boolean mask means "may attend": the inverse of megatron's convention.
    allowed = ~block_causal_mask(packed.cu_seqlens, seq_length)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    cu = packed.cu_seqlens.tolist()
    for start, end in zip(cu[:-1], cu[1:]):
        alone = F.scaled_dot_product_attention(
            q[:, start:end], k[:, start:end], v[:, start:end], is_causal=True
        )
        torch.testing.assert_close(out[:, start:end], alone)


def test_packed_and_unpacked_fields_agree_per_sample():
    samples = _random_samples(20, seed=2, max_len=30)
    seq_length = 48
    bins = pack_samples(samples, seq_length=seq_length, pad_token_id=PAD)
    packed = collate(bins)
    rows = unpacked_batch(samples, seq_length, pad_token_id=PAD)
    for row, packed_bin in enumerate(bins):
        cu = packed_bin.cu_seqlens.tolist()
        for j, index in enumerate(packed_bin.sample_indices):
            start, end = cu[j], cu[j + 1]
            n = end - start
            for field in ("tokens", "labels", "loss_mask", "position_ids"):
                assert torch.equal(packed[field][row, start:end], rows[field][index, :n]), field
            assert torch.equal(
                packed["attention_mask"][row, 0, start:end, start:end],
                rows["attention_mask"][index, 0, :n, :n],
            )
    # Trained positions agree in number, and padding is never trained.
    assert packed["loss_mask"].sum() == rows["loss_mask"].sum()


def test_collate_shapes_and_flattened_cu_seqlens():
    a = TokenizedSample(input_ids=[1, 2, 3], loss_mask=[0, 1, 1])
    b = TokenizedSample(input_ids=[4, 5, 6, 7, 8, 9], loss_mask=[0, 0, 1, 1, 1, 1])
    bins = [fill_bin([a, a], seq_length=8), fill_bin([b], seq_length=8)]
    batch = collate(bins)
    assert batch["tokens"].shape == batch["labels"].shape == (2, 8)
    assert batch["loss_mask"].dtype == torch.float32
    assert batch["attention_mask"].shape == (2, 1, 8, 8)
    assert batch["cu_seqlens"].tolist() == [0, 3, 6, 8, 14, 16]
    assert batch["cu_seqlens"].dtype == torch.int32 and batch["max_seqlen"].item() == 6
    assert "attention_mask" not in collate(bins, with_attention_mask=False)
