"""Eq. 2 saliency: the vectorised per-sample sums, and M measured during real training at
TP 1/2, DP 1/2, padded and packed input, micro-batches, full recompute, and the CP reduction,
against M computed by the definition from unsharded activations."""

from __future__ import annotations

import pytest
import torch
from longact_helpers import cp_reduction_batches, reference_saliency, sample_roots

from megatron_longact.longact.saliency import (
    SaliencyAccumulator,
    describe_micro_batch,
    per_sample_sum_squares,
)
from megatron_longact.models.cp_layout import cp_token_index

ATOL = 2e-6


def test_per_sample_sums_padded_and_packed_match_loops():
    gen = torch.Generator().manual_seed(0)
    out = torch.randn(8, 3, 5, generator=gen)  # [s, b, R]
    token_mask = torch.tensor([[1] * 8, [1] * 3 + [0] * 5, [0] * 8], dtype=torch.float32)
    padded = describe_micro_batch({"token_mask": token_mask})
    sums = per_sample_sum_squares(out, padded)
    assert padded.num_samples == 3 and padded.tokens_per_sample.tolist() == [8, 3, 0]
    expected = sample_roots(out.transpose(0, 1), token_mask, [[8], [8], [8]])
    torch.testing.assert_close(sums[:2].double().sqrt(), expected)
    assert sums[2].abs().max() == 0

    # Packed: row 0 = [3, 5], row 1 = [2, 4, 2(pad)], row 2 = [8]; cu over the b * S tokens.
    segments = [[3, 5], [2, 4, 2], [8]]
    cu = torch.tensor([0, 3, 8, 10, 14, 16, 24], dtype=torch.int32)
    token_mask = torch.ones(3, 8)
    token_mask[1, 6:] = 0
    packed = describe_micro_batch({"token_mask": token_mask, "cu_seqlens": cu})
    assert packed.num_samples == 6 and packed.tokens_per_sample.tolist() == [3, 5, 2, 4, 0, 8]
    sums = per_sample_sum_squares(out, packed)
    keep = packed.tokens_per_sample > 0
    torch.testing.assert_close(
        sums[keep].double().sqrt(), sample_roots(out.transpose(0, 1), token_mask, segments)
    )
    # No token_mask: every token and every row counts.
    dense = describe_micro_batch({"tokens": torch.zeros(3, 8, dtype=torch.long)})
    torch.testing.assert_close(per_sample_sum_squares(out, dense), out.pow(2).sum(0))


def test_sequence_chunking_does_not_change_the_sums(monkeypatch):
    import megatron_longact.longact.saliency as saliency

    gen = torch.Generator().manual_seed(1)
    out = torch.randn(37, 3, 5, generator=gen)
    token_mask = (torch.rand(3, 37, generator=gen) > 0.3).float()
    cu = torch.tensor([0, 10, 37, 50, 111], dtype=torch.int32)
    for batch in ({"token_mask": token_mask}, {"token_mask": token_mask, "cu_seqlens": cu}):
        samples = describe_micro_batch(batch)
        whole = per_sample_sum_squares(out, samples)
        monkeypatch.setattr(saliency, "HOOK_CHUNK_BYTES", 4 * 5 * 3 * 4)  # 4 positions
        torch.testing.assert_close(per_sample_sum_squares(out, samples), whole)
        monkeypatch.undo()


def test_accumulator_counts_samples_with_real_tokens_only():
    acc = SaliencyAccumulator([0], num_local_rows=2)
    acc.begin_micro_batch(
        describe_micro_batch({"token_mask": torch.tensor([[1.0, 1.0], [0.0, 0.0]])})
    )
    acc.add(0, torch.tensor([[[3.0, 0.0], [9.0, 9.0]], [[4.0, 1.0], [9.0, 9.0]]]))
    acc.begin_micro_batch(describe_micro_batch({"token_mask": torch.tensor([[1.0, 0.0]])}))
    acc.add(0, torch.tensor([[[1.0, 2.0]], [[7.0, 7.0]]]))
    measured, num_samples = acc.reduce()
    assert num_samples == 2
    torch.testing.assert_close(measured[0], torch.tensor([(5.0 + 1.0) / 2, (1.0 + 2.0) / 2]))


def test_layout_errors_are_user_errors():
    with pytest.raises(ValueError, match="cu_seqlens"):
        describe_micro_batch({"tokens": torch.zeros(1, 8), "cu_seqlens": torch.tensor([0, 5])})
    with pytest.raises(ValueError, match="multiples"):
        describe_micro_batch(  # CP=2 rank 0's cut of a packed row that is not padded for it
            {"tokens": torch.zeros(1, 8), "cu_seqlens": torch.tensor([0, 3, 8])},
            localize=lambda f: {"sample_ids": f["sample_ids"][
                :, cp_token_index(f["cu_seqlens"], cp_size=2, cp_rank=0)]},
        )  # fmt: skip


def _assert_matches(measured, reference, *, layers=(0, 1), where=""):
    assert sorted(measured) == sorted(reference) == list(layers), where
    torch.testing.assert_close(measured, reference, atol=ATOL, rtol=1e-5,
                               msg=lambda m: f"{where} M: {m}")  # fmt: skip


@pytest.mark.parametrize("kind", ["padded", "packed"])
def test_single_process_equals_definition(single, kind):
    # Two micro-batches of two rows: also checks accumulation over micro-batches.
    (observed,) = single[kind]
    _assert_matches(observed["measured"], reference_saliency(observed, packed=kind == "packed"))
    assert observed["fires"] == {0: 2, 1: 2}
    assert all(v.abs().max() > 0.1 for per in observed["measured"].values() for v in per.values())


def test_full_recompute_counts_each_micro_batch_once(single):
    (observed,), (padded,) = single["recompute"], single["padded"]
    assert observed["fires"] == {0: 4, 1: 4}  # the hook really ran twice per micro-batch
    _assert_matches(observed["measured"], reference_saliency(padded, packed=False))


@pytest.mark.parametrize("kind", ["padded", "packed"])
def test_data_parallel_2_equals_definition(single, dp2, kind):
    reference = reference_saliency(single[kind][0], packed=kind == "packed")
    for rank, observed in enumerate(dp2[kind]):
        assert (observed["dims"].tp, observed["dims"].dp) == (1, 2)
        _assert_matches(observed["measured"], reference, where=f"rank {rank}")


@pytest.mark.parametrize("kind", ["padded", "packed"])
def test_tensor_2_data_2_equals_definition_on_every_rank(single, tp2_dp2, kind):
    (expected,) = single[kind]
    reference = reference_saliency(expected, packed=kind == "packed")
    for rank, observed in enumerate(tp2_dp2[kind]):
        assert (observed["dims"].tp, observed["dims"].dp) == (2, 2)
        _assert_matches(observed["measured"], reference, where=f"rank {rank}")
        for layer, per_projection in expected["selection"].items():
            for projection, mask in per_projection.items():
                assert torch.equal(observed["selection"][layer][projection], mask), (
                    f"rank {rank} mask {layer}.{projection}"
                )


def test_context_parallel_reduces_sums_of_squares_before_sqrt(dp2):
    roots = {}  # {layer: [samples, R]} of the whole (unsplit) micro-batches
    for batch in cp_reduction_batches():
        token_mask = batch["token_mask"]
        if "cu_seqlens" in batch:
            segments = [batch["cu_seqlens"].diff().tolist()]
        else:
            segments = [[token_mask.shape[1]]] * token_mask.shape[0]
        for layer, acts in batch["acts"].items():
            roots.setdefault(layer, []).append(sample_roots(acts, token_mask, segments))
    reference = {layer: torch.cat(r).mean(dim=0).float() for layer, r in roots.items()}
    for observed in dp2["cp_reduction"]:
        # 2 + 3 padded rows with real tokens, 2 packed segments (one only on CP rank 0).
        assert observed["num_samples"] == len(torch.cat(roots[3])) == 7
        for layer, values in reference.items():
            torch.testing.assert_close(observed["measured"][layer], values, atol=ATOL, rtol=1e-5)


def test_pipeline_stages_measure_their_own_layers(dp2):
    for observed in dp2["pipeline"]:
        layer = observed["dims"].pp_rank  # micro-qwen3: one layer per stage
        # Each stage against the definition from its own weights and inputs.
        reference = reference_saliency(observed, packed=True)
        _assert_matches(observed["measured"], reference, layers=[layer], where=f"stage {layer}")
        assert sorted(observed["all_stages"]) == [0, 1]  # gathered over the pipeline group
        metrics = observed["metrics"]  # identical on both stages, both layers present
        assert {"longact/layer00/q_trainable_frac", "longact/layer01/k_trainable_frac"} <= set(
            metrics
        )
    first, second = dp2["pipeline"]
    assert first["metrics"].keys() == second["metrics"].keys()
