"""The layout rules and file helpers, without megatron processes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from megatron_longact.models.hf_config import parse_hf_config
from megatron_longact.models.hf_weights.hf_files import (
    INDEX_FILE,
    SINGLE_FILE,
    HFWeights,
    ShardWriter,
    parse_size,
)
from megatron_longact.models.hf_weights.mapping import (
    HF_LM_HEAD,
    check_hf_tensors,
    expected_hf_shapes,
    fuse_gate_up_shard,
    padded_vocab_size,
    split_gate_up,
    strip_checkpoint_prefix,
    tp_block,
)
from megatron_longact.models.qkv_layout import QKVLayout

HIDDEN = 6


@pytest.mark.parametrize(("heads", "groups", "head_dim"), [(8, 2, 8), (8, 8, 8), (4, 1, 16)])
def test_qkv_rows_follow_the_per_group_formula(heads, groups, head_dim):
    # The row formula measured on megatron 0.16 (shared/notes/megatron-core-0.16-facts.md).
    layout = QKVLayout(num_heads=heads, num_groups=groups, head_dim=head_dim)
    q = torch.randn(heads * head_dim, HIDDEN)
    k = torch.randn(groups * head_dim, HIDDEN)
    v = torch.randn(groups * head_dim, HIDDEN)
    fused = layout.fuse(q, k, v)
    n, block = heads // groups, (heads // groups + 2) * head_dim
    for h in range(heads):
        for d in (0, head_dim - 1):
            assert torch.equal(
                fused[(h // n) * block + (h % n) * head_dim + d], q[h * head_dim + d]
            )
    for g in range(groups):
        for d in (0, head_dim - 1):
            assert torch.equal(fused[g * block + n * head_dim + d], k[g * head_dim + d])
            assert torch.equal(fused[g * block + (n + 1) * head_dim + d], v[g * head_dim + d])
    back = layout.unfuse(fused)
    for got, want in zip(back, (q, k, v)):
        assert torch.equal(got, want)
    # Biases use the same row order.
    bias = layout.fuse(q[:, 0], k[:, 0], v[:, 0])
    assert torch.equal(bias, fused[:, 0])


def test_qkv_split_rejects_a_row_count_from_another_config():
    layout = QKVLayout(num_heads=4, num_groups=2, head_dim=8)
    with pytest.raises(ValueError, match="need 64"):
        layout.unfuse(torch.zeros(48, HIDDEN))


def test_gate_up_shards_concatenate_to_the_checkpoint_layout():
    gate, up = torch.randn(8, HIDDEN), torch.randn(8, HIDDEN)
    tp = 2
    shards = [fuse_gate_up_shard(gate, up, tp_rank=r, tp=tp) for r in range(tp)]
    assert torch.equal(shards[1], torch.cat([gate[4:], up[4:]]))
    # megatron's SwiGLU factory saves each shard's halves at global offsets: [gate; up].
    saved = torch.cat([s.chunk(2)[0] for s in shards] + [s.chunk(2)[1] for s in shards])
    got_gate, got_up = split_gate_up(saved)
    assert torch.equal(got_gate, gate) and torch.equal(got_up, up)


def test_tp_block_and_vocab_padding():
    full = torch.arange(12).reshape(3, 4)
    assert torch.equal(tp_block(full, dim=1, tp_rank=1, tp=2), full[:, 2:])
    with pytest.raises(ValueError, match="TP=2"):
        tp_block(full, dim=0, tp_rank=0, tp=2)
    assert padded_vocab_size(127, tp=2) == 128
    assert padded_vocab_size(128, tp=2) == 128
    assert padded_vocab_size(151_665, tp=8) == 151_672


def test_checkpoint_prefix_and_optimizer_keys():
    key = "module.decoder.layers.self_attention.linear_qkv.weight"
    assert strip_checkpoint_prefix(key) == "decoder.layers.self_attention.linear_qkv.weight"
    assert strip_checkpoint_prefix("embedding.word_embeddings.weight") is not None
    assert strip_checkpoint_prefix("optimizer.distributed.dp_group_idx_0.exp_avg") is None


def _arch(**overrides):
    config = {
        "model_type": "qwen2",
        "hidden_size": 8,
        "intermediate_size": 12,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": 16,
        "max_position_embeddings": 32,
        "tie_word_embeddings": True,
    }
    return parse_hf_config({**config, **overrides})


def test_expected_tensors_and_their_check():
    arch = _arch()
    shapes = expected_hf_shapes(arch)
    assert shapes["model.layers.1.self_attn.k_proj.bias"] == (4,)  # qwen2: qkv biases
    assert HF_LM_HEAD not in shapes  # tied
    check_hf_tensors(dict(shapes), arch=arch, source="x")
    check_hf_tensors({**shapes, HF_LM_HEAD: (16, 8)}, arch=arch, source="x")  # stored anyway
    with pytest.raises(ValueError, match="missing"):
        check_hf_tensors(
            {k: v for k, v in shapes.items() if "layers.1." not in k}, arch=arch, source="x"
        )
    with pytest.raises(ValueError, match=r"o_proj\.bias"):
        check_hf_tensors(
            {**shapes, "model.layers.0.self_attn.o_proj.bias": (8,)}, arch=arch, source="x"
        )
    with pytest.raises(ValueError, match="mlp.up_proj.weight has shape"):
        check_hf_tensors(
            {**shapes, "model.layers.0.mlp.up_proj.weight": (10, 8)}, arch=arch, source="x"
        )


def test_shard_writer_bounds_shards_and_writes_the_index(tmp_path):
    tensors = {f"t{i}": torch.full((10,), float(i)) for i in range(5)}  # 40 bytes each
    writer = ShardWriter(tmp_path, max_shard_bytes=100)
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    files = writer.finish()
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == 200
    weights = HFWeights(tmp_path)
    assert weights.shapes() == {name: (10,) for name in tensors}
    for name, tensor in tensors.items():
        assert torch.equal(weights.read(name), tensor)
    assert torch.equal(weights.read("t3", dim=0, start=2, stop=5), tensors["t3"][2:5])
    assert not list(tmp_path.glob("*.tmp"))


def test_single_shard_is_model_safetensors(tmp_path):
    writer = ShardWriter(tmp_path, max_shard_bytes=10**6)
    writer.add("a", torch.ones(3))
    assert writer.finish() == [SINGLE_FILE]
    assert not (tmp_path / INDEX_FILE).exists()
    assert torch.equal(HFWeights(tmp_path).read("a"), torch.ones(3))


def test_missing_shard_is_named(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        HFWeights(tmp_path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("64KiB", 65536), ("4096", 4096)],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_parse_size_rejects_nonsense():
    with pytest.raises(ValueError, match="max-shard-size"):
        parse_size("five gigs")
