"""LongAct on a mixture-of-experts model is LongAct on its attention, exactly as for dense.

Two tiny Hugging Face models that compute the same function: a Qwen3-MoE (8 experts, top-2,
``norm_topk_prob``) whose experts all equal one MLP, and a dense Qwen3 with that MLP and the
MoE's embeddings, norms, attention and head copied over. With renormalised top-k routing the
MoE block returns ``sum_k p_k * MLP(x) = MLP(x)`` (the k weights sum to 1), so every layer's
Q/K activations, hence LongAct's saliency M, agree up to rounding, and the masks agree exactly.

In a 2-rank gloo world, the MoE at expert parallel 2 and the dense model at DP=2 take one
``longact.strategy=massive`` step on the same batches through the project's controller. Then:
the saliency agrees (fp32 rounding), the selections and row masks are equal, the controller
masks only ``self_attention.linear_qkv`` weights, and every expert and router gradient equals
that of the same MoE step without LongAct (``longact.strategy=none``) bit for bit.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from megatron_longact.runtime.launch import run_local

SALIENCY_RTOL = 1e-4  # fp32; sum_k p_k * y rounds differently from y
LONGACT = ["longact.strategy=massive", "longact.ratio=0.3", "longact.targets=[q,k]"]
STEPS_SEQ = 32
GLOBAL_BATCH = 4


def _write_pair(root: Path) -> tuple[Path, Path]:
    """Saves the MoE (all experts = expert 0 of a random model) and the dense twin; returns
    (moe_dir, dense_dir), each a config.json plus one model.safetensors."""
    from safetensors.torch import save_file
    from tiny_hf import load_hf_tensors, save_tiny_hf_model

    moe_dir, dense_dir = root / "moe", root / "dense"
    save_tiny_hf_model(moe_dir, seed=3, preset_name="micro-qwen3-moe")
    tensors = load_hf_tensors(moe_dir)
    config = json.loads((moe_dir / "config.json").read_text())
    for name in list(tensors):  # Hub layout: model.layers.L.mlp.experts.E.gate_proj.weight
        parts = name.split(".")
        if "experts" in parts and parts[parts.index("experts") + 1] != "0":
            parts[parts.index("experts") + 1] = "0"
            tensors[name] = tensors[".".join(parts)].clone()
    for stale in list(moe_dir.glob("*.safetensors")) + list(moe_dir.glob("*.index.json")):
        stale.unlink()
    save_file(tensors, moe_dir / "model.safetensors", metadata={"format": "pt"})

    dense = {}
    for name, tensor in tensors.items():
        if ".mlp.gate." in name or (".experts." in name and ".experts.0." not in name):
            continue  # the router and the copies
        dense[name.replace(".mlp.experts.0.", ".mlp.")] = tensor
    moe_only = ("num_experts", "num_local_experts", "moe_", "norm_topk", "router_",
                "decoder_sparse", "mlp_only_layers", "output_router_logits")  # fmt: skip
    dense_config = {k: v for k, v in config.items() if not k.startswith(moe_only)}
    dense_config.update(
        architectures=["Qwen3ForCausalLM"],
        model_type="qwen3",
        intermediate_size=config["moe_intermediate_size"],
    )
    dense_dir.mkdir()
    (dense_dir / "config.json").write_text(json.dumps(dense_config, indent=2))
    save_file(dense, dense_dir / "model.safetensors", metadata={"format": "pt"})
    for extra in moe_dir.iterdir():  # the tokenizer files
        if extra.suffix != ".safetensors" and extra.name != "config.json":
            shutil.copy2(extra, dense_dir / extra.name)
    return moe_dir, dense_dir


@dataclass(frozen=True)
class MaskRun:
    """One model's LongAct step on one rank."""

    saliency: dict[int, dict[str, torch.Tensor]]
    """M per layer and projection, reduced over DP: {layer: {"q": [N, D], "k": [G, D], ...}}."""
    selection: dict[int, dict[str, torch.Tensor]]
    """{layer: {"q"/"k": bool [heads, D]}}, True = trains."""
    row_masks: dict[int, torch.Tensor]
    """{layer: bool [(N + 2G) * D]} over linear_qkv's rows on this rank (TP=1: all)."""
    masked_modules: list[str]
    """Names of the modules whose gradients the controller masks."""
    grads: dict[str, torch.Tensor]
    """main_grad of every parameter after the DP reduce and LongAct (MoE runs only)."""


def _batches(step: int, *, vocab: int, dp_rank: int, dp: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(500 + step)
    rows = []
    for _ in range(GLOBAL_BATCH):
        tokens = torch.randint(0, vocab, (STEPS_SEQ,), generator=gen)
        rows.append(
            {
                "tokens": tokens.unsqueeze(0),
                "labels": torch.roll(tokens, -1).unsqueeze(0),
                "loss_mask": torch.ones(1, STEPS_SEQ),
                "position_ids": torch.arange(STEPS_SEQ).unsqueeze(0),
            }
        )
    per_rank = GLOBAL_BATCH // dp
    return rows[dp_rank * per_rank : (dp_rank + 1) * per_rank]


def _one_step(hf_dir: str, overrides: list[str], dims, *, keep_grads: bool) -> MaskRun:
    from megatron_longact.config import JobConfig, load_config
    from megatron_longact.longact.controller import LongActController
    from megatron_longact.longact.masks import row_mask
    from megatron_longact.runtime.forward import lm_forward_step
    from megatron_longact.runtime.setup import load_start_weights, setup_train_state
    from megatron_longact.runtime.train_step import train_step

    job = load_config(
        JobConfig,
        None,
        [f"model.hf_path={hf_dir}", "train.precision=fp32", "optim.lr=1e-3", *overrides],
    )
    state = setup_train_state(job, dims)
    load_start_weights(job, state)
    controller = LongActController.from_train_state(job.longact, state)
    grads: dict[str, torch.Tensor] = {}
    named = list(state.model[0].named_parameters())
    masked_then = state.transformer_config.finalize_model_grads_func

    def capture(*args, **kwargs):  # the grads optimizer.step() reads (before clipping)
        result = masked_then(*args, **kwargs)
        if keep_grads:
            grads.update({n: p.main_grad.detach().clone() for n, p in named})
        return result

    state.transformer_config.finalize_model_grads_func = capture
    micro = _batches(0, vocab=state.arch.vocab_size, dp_rank=dims.dp_rank, dp=dims.dp)
    train_step(
        state,
        forward_step_func=lm_forward_step,
        data_iterator=controller.observe(iter(micro)),
        num_microbatches=len(micro),
        seq_length=STEPS_SEQ,
        micro_batch_size=1,
    )
    names = {id(m): n for n, m in state.model[0].named_modules()}
    masked = [names[id(m)] for m in controller.modules.values()] if controller.enabled else []
    return MaskRun(
        saliency=controller.saliency,
        selection=controller.selection,
        row_masks={n: row_mask(controller.layout, s) for n, s in controller.selection.items()},
        masked_modules=masked,
        grads=grads,
    )


def world_dense_and_moe(moe_dir: str, dense_dir: str) -> dict[str, MaskRun]:
    """Per rank (2 ranks): the dense model at DP=2 and the MoE at EP=2, with and without
    LongAct, from the same batches."""
    from megatron_longact.config.schema import ParallelConfig
    from megatron_longact.runtime.distributed import init_distributed

    dims = init_distributed(ParallelConfig(expert_model_parallel_size=2), seed=1234)
    ep2 = ["parallel.expert_model_parallel_size=2"]
    return {
        "dense": _one_step(dense_dir, LONGACT, dims, keep_grads=False),
        "moe": _one_step(moe_dir, [*ep2, *LONGACT], dims, keep_grads=True),
        "moe_dense_update": _one_step(
            moe_dir, [*ep2, "longact.strategy=none"], dims, keep_grads=True
        ),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[dict[str, MaskRun]]:
    moe_dir, dense_dir = _write_pair(tmp_path_factory.mktemp("moe_vs_dense"))
    return run_local(world_dense_and_moe, 2, str(moe_dir), str(dense_dir))


def test_moe_saliency_and_masks_equal_the_dense_paths(runs):
    for rank in runs:
        dense, moe = rank["dense"], rank["moe"]
        assert sorted(moe.saliency) == sorted(dense.saliency) == [0, 1]
        for layer, per_projection in dense.saliency.items():
            for projection, m in per_projection.items():
                torch.testing.assert_close(
                    moe.saliency[layer][projection], m, rtol=SALIENCY_RTOL, atol=0.0
                )
        for layer, per_projection in dense.selection.items():
            assert sorted(per_projection) == ["k", "q"]
            for projection, keep in per_projection.items():
                assert torch.equal(moe.selection[layer][projection], keep), (layer, projection)
            assert torch.equal(moe.row_masks[layer], dense.row_masks[layer])
            assert 0 < int((~moe.row_masks[layer]).sum()) < moe.row_masks[layer].numel()


def test_only_attention_qkv_rows_are_masked_in_the_moe(runs):
    for rank in runs:
        moe, plain = rank["moe"], rank["moe_dense_update"]
        assert moe.masked_modules and all(
            n.endswith("self_attention.linear_qkv") for n in moe.masked_modules
        ), moe.masked_modules
        experts = [n for n in moe.grads if ".experts." in n]
        routers = [n for n in moe.grads if ".router." in n]
        assert experts and routers, sorted(moe.grads)
        for name, grad in moe.grads.items():
            if "linear_qkv" in name:
                continue
            # Experts, router and everything else: the gradient LongAct leaves alone.
            assert torch.equal(grad, plain.grads[name]), name
        for name in (n for n in moe.grads if "linear_qkv.weight" in n):
            layer = int(name.split("layers.")[1].split(".")[0])
            frozen = ~moe.row_masks[layer]
            assert torch.all(moe.grads[name][frozen] == 0), name
            assert torch.equal(moe.grads[name][~frozen], plain.grads[name][~frozen]), name
