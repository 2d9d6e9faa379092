"""Saliency statistics on hand-made M: outlier ratios, top-λ shares, Jaccard and its baseline."""

from __future__ import annotations

import math
import random

import pytest
import torch

from megatron_longact.study.hf_model import hf_shape, per_sample_saliency, profile_from_samples
from megatron_longact.study.observations import jaccard, outlier_stats, random_jaccard


def test_outlier_stats_by_hand():
    # One head, D=10, one massive dim: M = [10, 1 x 9]. λ=0.1 keeps one dim.
    m = torch.tensor([[10.0] + [1.0] * 9])
    s = outlier_stats(m, ratio=0.1)
    assert s.max_over_median == pytest.approx(10.0)
    assert s.share_sum == pytest.approx(10 / 19)
    assert s.share_sum_sq == pytest.approx(100 / 109)
    flat = outlier_stats(torch.ones(3, 10), ratio=0.3)
    assert flat.share_sum == pytest.approx(0.3) and flat.max_over_median == 1.0


def test_jaccard():
    a = torch.tensor([[True, True, False, False]])
    b = torch.tensor([[False, True, True, False]])
    assert jaccard(a, b) == pytest.approx(1 / 3)
    assert jaccard(a, a) == 1.0
    with pytest.raises(ValueError, match="shape"):
        jaccard(a, b.t())


def test_random_jaccard_matches_simulation():
    rng = random.Random(0)
    k, d = 19, 64  # floor(0.3 * 64)
    draws = []
    for _ in range(20000):
        x, y = set(rng.sample(range(d), k)), set(rng.sample(range(d), k))
        draws.append(len(x & y) / len(x | y))
    assert random_jaccard(ratio=0.3, head_dim=d) == pytest.approx(sum(draws) / len(draws), abs=3e-3)
    assert math.isclose(random_jaccard(ratio=1.0, head_dim=8), 1.0)


def test_hf_saliency_is_eq2():
    """M from the HF hooks equals Eq. 2 computed by hand from the q_proj output."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    samples = [[1, 2, 3, 4, 5], [7, 8, 9]]
    profile = profile_from_samples(per_sample_saliency(model, samples), hf_shape(model))
    seen = []
    handle = model.model.layers[0].self_attn.k_proj.register_forward_hook(
        lambda _m, _i, out: seen.append(out[0])
    )
    with torch.no_grad():
        for ids in samples:
            model(torch.tensor([ids]), use_cache=False)
    handle.remove()
    expected = torch.stack([x.square().sum(0).sqrt() for x in seen]).mean(0).view(1, 16)
    torch.testing.assert_close(profile.saliency[0]["k"], expected)
    assert profile.num_samples == 2 and profile.saliency[0]["q"].shape == (2, 16)
