"""``longact perturb``'s clamp: λ=0 is the identity bit for bit, the random arm is seeded, the
clamped channels hold the tensor's mean, and the repetition rate counts repeated n-grams.

A small random-initialised Llama (HF) stands in for SmolLM2: the clamp is model-agnostic.
"""

from __future__ import annotations

import pytest
import torch

from megatron_longact.study.hf_model import hf_shape, per_sample_saliency, profile_from_samples
from megatron_longact.study.perturb import clamp_hooks, clamp_masks, repetition_rate


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        tie_word_embeddings=True,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    tokens = [torch.randint(0, 97, (n,)).tolist() for n in (20, 33, 27)]
    profile = profile_from_samples(per_sample_saliency(model, tokens), hf_shape(model))
    return model, profile


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens, use_cache=False).logits


def test_ratio_zero_changes_nothing_bit_for_bit(llama):
    model, profile = llama
    tokens = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    before = _logits(model, tokens)
    for arm in ("massive", "min", "random"):
        masks = clamp_masks(profile, arm=arm, ratio=0.0, seed=3)
        assert not any(m.any() for per in masks.values() for m in per.values())
        with clamp_hooks(model, masks):
            assert torch.equal(_logits(model, tokens), before), arm
    # And a real clamp does change the output (the test above is not vacuous).
    with clamp_hooks(model, clamp_masks(profile, arm="massive", ratio=0.3, seed=3)):
        assert not torch.equal(_logits(model, tokens), before)


def test_random_arm_is_seeded(llama):
    _, profile = llama
    a = clamp_masks(profile, arm="random", ratio=0.25, seed=11)
    b = clamp_masks(profile, arm="random", ratio=0.25, seed=11)
    c = clamp_masks(profile, arm="random", ratio=0.25, seed=12)
    for layer in a:
        for projection in ("q", "k"):
            assert torch.equal(a[layer][projection], b[layer][projection])
            assert int(a[layer][projection].sum(dim=1)[0]) == 4  # floor(0.25 * 16) per head
    assert any(not torch.equal(a[n][p], c[n][p]) for n in a for p in ("q", "k"))


def test_massive_and_min_pick_the_extremes_of_m(llama):
    _, profile = llama
    massive = clamp_masks(profile, arm="massive", ratio=0.25, seed=0)
    low = clamp_masks(profile, arm="min", ratio=0.25, seed=0)
    for layer, per in profile.saliency.items():
        m = per["q"]
        # Per head: every clamped dim of massive is at least every kept one; min the reverse.
        assert torch.all(
            m.masked_fill(~massive[layer]["q"], float("inf")).min(1).values
            >= m.masked_fill(massive[layer]["q"], -float("inf")).max(1).values
        )
        assert torch.all(
            m.masked_fill(~low[layer]["q"], -float("inf")).max(1).values
            <= m.masked_fill(low[layer]["q"], float("inf")).min(1).values
        )


def test_clamped_channels_hold_the_tensor_mean(llama):
    model, profile = llama
    masks = clamp_masks(profile, arm="massive", ratio=0.5, seed=0)
    q_proj = model.model.layers[1].self_attn.q_proj
    seen = {}
    tokens = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(2))
    # Forward hooks run in registration order: the first sees the raw output, the last the
    # clamped one.
    first = q_proj.register_forward_hook(lambda _m, _i, out: seen.setdefault("raw", out.clone()))
    with clamp_hooks(model, masks):
        last = q_proj.register_forward_hook(lambda _m, _i, out: seen.setdefault("out", out))
        _logits(model, tokens)
        last.remove()
    first.remove()
    raw, out = seen["raw"][0].view(16, 4, 16), seen["out"][0].view(16, 4, 16)  # [s, heads, D]
    mask = masks[1]["q"]
    assert torch.all(out[:, mask] == raw.mean())
    assert torch.equal(out[:, ~mask], raw[:, ~mask])


def test_repetition_rate():
    assert repetition_rate([[1, 2, 3, 4, 5]], n=2) == 0.0
    assert repetition_rate([[3] * 10], n=3) == pytest.approx(1 - 1 / 8)
    # Pooled over generations: 4 bigrams in the first, 2 (one repeated) in the second.
    assert repetition_rate([[1, 2, 3, 4, 5], [7, 7, 7]], n=2) == pytest.approx(1 - 5 / 6)
    assert repetition_rate([[1]], n=3) == 0.0


def test_unknown_arm_is_refused(llama):
    with pytest.raises(ValueError, match="not one of"):
        clamp_masks(llama[1], arm="top", ratio=0.3, seed=0)
