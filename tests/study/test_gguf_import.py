"""The GGUF import writes exactly the tensors ``gguf.dequantize`` gives (Q/K un-permuted)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

# GGUF tensor names -> HF Llama names, written out by hand (gguf/constants.py TENSOR_NAMES has
# the GGUF side; transformers derives the same map in modeling_gguf_pytorch_utils.py
# get_gguf_hf_weights_map), so the test does not trust the code under test for it.
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
}


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    _, layer, kind, suffix = gguf_name.split(".")
    return f"model.layers.{layer}.{_LAYER_NAMES[kind]}.{suffix}"


def _unpermute_rope_rows(weight: np.ndarray, *, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row order (per head: the two rotary halves interleaved).

    llama.cpp's convert_hf_to_gguf.py LlamaModel.permute stores each head's rows as
    (head_dim/2, 2) pairs; HF keeps (2, head_dim/2) halves. Shapes: (rows, cols) both ways.
    """
    rows = weight.shape[0]
    pairs = weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
    return pairs.swapaxes(1, 2).reshape(weight.shape)


@pytest.mark.slow
def test_import_matches_gguf_dequantize(smollm2_dir):
    import gguf
    from safetensors.torch import load_file

    from megatron_longact.study.gguf_import import smollm2_gguf_path

    reader = gguf.GGUFReader(smollm2_gguf_path())
    saved = load_file(str(smollm2_dir / "model.safetensors"))
    config = json.loads((smollm2_dir / "config.json").read_text())
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    quantized = 0
    for tensor in reader.tensors:
        expected = gguf.dequantize(tensor.data, tensor.tensor_type)
        kind = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else None
        if kind in heads:
            expected = _unpermute_rope_rows(expected, num_heads=heads[kind])
        got = saved[_hf_name(tensor.name)]
        assert got.dtype == torch.float32
        assert torch.equal(got, torch.from_numpy(np.ascontiguousarray(expected))), tensor.name
        quantized += tensor.tensor_type == gguf.GGMLQuantizationType.Q4_1
    assert len(reader.tensors) == 272 and quantized > 100  # a real Q4_1 file, not all fp32
    # Tied embeddings: the folder loads as a plain model whose lm_head is the embedding.
    assert config["tie_word_embeddings"] and config["num_hidden_layers"] == 30


@pytest.mark.slow
def test_imported_folder_loads_and_answers(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])


def test_import_refuses_existing_model(tmp_path):
    from megatron_longact.study.gguf_import import import_gguf

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="already holds a model"):
        import_gguf(tmp_path / "x.gguf", tmp_path)


def test_import_missing_file_names_it(tmp_path):
    from megatron_longact.study.gguf_import import import_gguf

    with pytest.raises(FileNotFoundError, match="no such file"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "out")
