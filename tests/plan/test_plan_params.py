"""Parameter counts of the planner's model presets and Hugging Face config parsing."""

import json

import pytest

from megatron_longact.plan.model_spec import (
    PRESETS,
    QWEN3_8B,
    ModelSpec,
    count_parameters,
    get_preset,
    layer_parameters,
    load_hf_config,
)

# Sizes on the Qwen3 model cards (billions of parameters).
PUBLISHED_SIZES = {"qwen3-4b": 4.0e9, "qwen3-8b": 8.2e9, "qwen3-32b": 32.8e9}

# Official config.json of Qwen/Qwen3-8B-Base (the fields the planner reads, plus some it ignores).
QWEN3_8B_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "max_position_embeddings": 32768,
    "model_type": "qwen3",
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 151936,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_SIZES))
def test_presets_match_published_sizes_within_one_percent(name):
    count = count_parameters(PRESETS[name])
    assert abs(count - PUBLISHED_SIZES[name]) / PUBLISHED_SIZES[name] < 0.01


def test_qwen3_8b_count_by_hand():
    # Per layer: qkv 4096*(4096+2*1024) + o 4096*4096 + MLP 3*4096*12288 + norms 2*4096+2*128.
    per_layer = 4096 * 6144 + 4096 * 4096 + 3 * 4096 * 12288 + 2 * 4096 + 2 * 128
    assert layer_parameters(QWEN3_8B) == per_layer == 192_946_432
    # 36 layers + untied embedding and output layer (151936 x 4096 each) + final norm.
    assert count_parameters(QWEN3_8B) == 36 * per_layer + 2 * 151936 * 4096 + 4096
    assert count_parameters(QWEN3_8B) == 8_190_735_360


def test_tiny_model_count_by_hand():
    spec = ModelSpec(
        name="tiny",
        hidden_size=8,
        num_layers=2,
        num_attention_heads=2,
        num_kv_heads=1,
        head_dim=4,
        ffn_hidden_size=16,
        vocab_size=16,
        tied_embeddings=False,
    )
    # qkv 8*(8+2*4)=128, o 8*8=64, MLP 3*8*16=384, norms 2*8+2*4=24 -> 600 per layer.
    assert layer_parameters(spec) == 600
    assert count_parameters(spec) == 2 * 600 + 2 * 16 * 8 + 8


def test_load_hf_config_reads_the_official_values(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_8B_CONFIG))
    from_dir = load_hf_config(tmp_path)
    from_file = load_hf_config(tmp_path / "config.json")
    assert from_dir == from_file
    for field in (
        "hidden_size",
        "num_layers",
        "num_attention_heads",
        "num_kv_heads",
        "head_dim",
        "ffn_hidden_size",
        "vocab_size",
        "tied_embeddings",
        "qk_norm",
    ):
        assert getattr(from_dir, field) == getattr(QWEN3_8B, field), field
    assert count_parameters(from_dir) == count_parameters(QWEN3_8B)


def test_load_hf_config_defaults_kv_heads_and_head_dim(tmp_path):
    raw = {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "vocab_size": 100,
        "max_position_embeddings": 4096,
    }
    (tmp_path / "config.json").write_text(json.dumps(raw))
    spec = load_hf_config(tmp_path)
    assert (spec.num_kv_heads, spec.head_dim, spec.tied_embeddings, spec.qk_norm) == (
        4,
        16,
        False,
        False,
    )


def test_load_hf_config_errors_name_the_file_and_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Hugging Face config"):
        load_hf_config(tmp_path / "missing")
    broken = dict(QWEN3_8B_CONFIG)
    del broken["intermediate_size"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="missing field 'intermediate_size'") as info:
        load_hf_config(path)
    assert str(path) in str(info.value)
    path.write_text(json.dumps({**QWEN3_8B_CONFIG, "num_experts": 128}))
    with pytest.raises(ValueError, match="mixture-of-experts"):
        load_hf_config(path)


def test_get_preset_is_case_insensitive_and_lists_choices():
    assert get_preset("Qwen3-8B") is QWEN3_8B
    with pytest.raises(ValueError, match="qwen3-32b"):
        get_preset("llama-70b")
