"""Qwen3-MoE HF -> megatron -> HF: megatron's logits equal transformers' (fp32, 1e-5) with the
experts whole (EP=1) and split over two ranks (EP=2, the all-to-all dispatcher on gloo); the
export is bitwise and in the Hub layout transformers and vLLM load (one tensor per expert)."""

from __future__ import annotations

import json

import moe_worlds as worlds
import pytest
import torch

from megatron_longact.convert.mcore_to_hf import export_checkpoint
from megatron_longact.models.hf_config import parse_hf_config, read_hf_config
from megatron_longact.runtime.launch import run_local


@pytest.fixture(scope="module")
def imported(tiny_moe, tmp_path_factory):
    """{ep: results of every rank of the import world}."""
    root = tmp_path_factory.mktemp("mcore_moe")
    return {
        ep: run_local(
            worlds.import_and_forward,
            ep,
            hf_dir=str(tiny_moe.hf_dir),
            out_dir=str(root / f"ep{ep}"),
            ep=ep,
            tokens=tiny_moe.tokens,
        )
        for ep in (1, 2)
    }


def test_config_maps_router_semantics(tiny_moe):
    arch = parse_hf_config(read_hf_config(tiny_moe.hf_dir))
    # transformers 5 saves the expert count as num_local_experts; Hub configs as num_experts.
    assert "num_local_experts" in json.loads((tiny_moe.hf_dir / "config.json").read_text())
    assert (arch.num_experts, arch.moe_router_topk, arch.moe_ffn_hidden_size) == (8, 2, 32)
    assert arch.moe_norm_topk_prob and arch.qk_layernorm


@pytest.mark.parametrize("ep", [1, 2])
def test_megatron_logits_match_transformers(imported, tiny_moe, ep):
    results = imported[ep]
    # Each EP rank holds 8/ep experts of a layer; every rank computes the same logits.
    assert [r["local_expert_params"] for r in results] == [2 * 8 // ep] * ep
    for result in results:
        torch.testing.assert_close(
            result["logits"], tiny_moe.logits, atol=worlds.LOGITS_ATOL, rtol=0
        )


@pytest.mark.parametrize("ep", [1, 2])
def test_export_is_bitwise_in_hub_layout(imported, tiny_moe, tmp_path, ep):
    out = tmp_path / f"ep{ep}"
    export_checkpoint(
        load=imported[ep][0]["ckpt"], out_dir=out, max_shard_size="50KB", show_progress=False
    )
    want, got = worlds.hf_state_dict(tiny_moe.hf_dir), worlds.hf_state_dict(out)
    assert sorted(got) == sorted(want)
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in got
    assert "model.layers.0.mlp.gate.weight" in got
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen3MoeForCausalLM"]


def test_export_reads_experts_in_chunks(imported, tiny_moe, tmp_path):
    """A budget below one layer's experts reads them in several chunks: same bits."""
    from megatron.core import dist_checkpointing

    from megatron_longact.convert.mcore_to_hf import (
        _model_keys,
        iter_hf_tensors,
        single_process_group,
    )

    ckpt = imported[2][0]["ckpt"]
    arch = parse_hf_config(read_hf_config(tiny_moe.hf_dir))
    want = worlds.hf_state_dict(tiny_moe.hf_dir)
    with single_process_group():
        metadata = dist_checkpointing.load_tensors_metadata(ckpt)
        keys = _model_keys(metadata)
        one_expert = 3 * 32 * 64 * 4  # gate, up, down of one expert in fp32
        got = dict(iter_hf_tensors(ckpt, metadata, keys, arch=arch, expert_bytes=3 * one_expert))
    assert sorted(got) == sorted(want)  # 8 experts in 4 chunks of 2 per layer
    assert all(torch.equal(got[n], t) for n, t in want.items())
