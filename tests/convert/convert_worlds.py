"""Helpers of the conversion tests: tiny random HF models (fp32, several safetensors shards)
with transformers' reference logits, and the functions the spawned gloo worlds run.

Every world batches many checks (a spawn costs ~10 s or more on 2 cores); tests assert on
what the worlds return.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

BATCH, SEQ = 2, 16
SHARD_SIZE = "20KB"  # several shards per model, so loading goes through the index
COMMON = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, max_position_embeddings=64)

# name -> (config class, config fields, rope_theta, tied). Together they cover: head_dim decoupled
# from hidden/heads, one KV group shared by two TP ranks (G=1 < TP=2), qkv biases, GQA with
# 4 heads per group, tied and untied heads, and a vocab (127) that TP=2 must pad.
VARIANTS = {
    "qwen3_tied": (
        Qwen3Config,
        dict(vocab_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
        1e6,
        True,
    ),
    "qwen3_untied": (
        Qwen3Config,
        dict(vocab_size=128, num_attention_heads=4, num_key_value_heads=1, head_dim=8),
        1e6,
        False,
    ),
    "qwen2_bias": (
        Qwen2Config,
        dict(vocab_size=128, num_attention_heads=4, num_key_value_heads=2),
        1e6,
        True,
    ),
    "llama_gqa": (
        LlamaConfig,
        dict(vocab_size=127, num_attention_heads=8, num_key_value_heads=2),
        5e5,
        False,
    ),
}


@dataclass(frozen=True)
class TinyModel:
    """A saved tiny HF model: its folder, vocab, test tokens [b, s] and reference logits
    [b, s, vocab] (transformers, fp32, eager attention)."""

    name: str
    hf_dir: Path
    vocab_size: int
    tokens: torch.Tensor
    logits: torch.Tensor


def hf_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor in a folder's safetensors files."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def reference_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    )
    with torch.no_grad():
        return model(input_ids=tokens).logits


def save_as_bf16(source: Path, folder: Path) -> None:
    """Re-saves an HF folder in bf16, config written like the original (legacy rope_theta)."""
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size=SHARD_SIZE)
    hf_config = json.loads((source / "config.json").read_text())
    hf_config["dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2))


def save_tiny(name: str, folder: Path, *, seed: int) -> TinyModel:
    config_cls, fields, rope_theta, tied = VARIANTS[name]
    torch.manual_seed(seed)
    config = config_cls(**COMMON, **fields, tie_word_embeddings=tied, rope_theta=rope_theta)
    model = AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():
        # Random everything, norms included, so a swapped or dropped tensor changes logits.
        for param_name, param in model.named_parameters():
            if "norm" in param_name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.1)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size=SHARD_SIZE)
    # Write the config the way Hub checkpoints have it (top-level rope_theta); transformers
    # 5 itself writes rope_parameters, which parse_hf_config does not read (see report).
    config_path = folder / "config.json"
    hf_config = json.loads(config_path.read_text())
    hf_config.pop("rope_parameters", None)
    hf_config["rope_theta"] = rope_theta
    config_path.write_text(json.dumps(hf_config, indent=2))
    assert (folder / "model.safetensors.index.json").is_file()
    tokens = torch.randint(
        0, fields["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(seed)
    )
    return TinyModel(
        name=name,
        hf_dir=folder,
        vocab_size=fields["vocab_size"],
        tokens=tokens,
        logits=reference_logits(folder, tokens),
    )


BF16_MODEL = "qwen3_untied_bf16"
LOGITS_ATOL = 1e-4  # fp32; megatron's and transformers' kernels differ in summation order
TRAIN_COMPAT_MODEL = "qwen3_untied"


def forward_from_checkpoint(*, hf_dir: str, ckpt: Path, tokens: torch.Tensor, tp: int):
    """Builds a fresh (randomly initialised) chunk, loads ``ckpt`` into it and returns the
    full-vocab logits [b, s, V] (gathered over TP) and the chunk."""
    import dataclasses

    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_longact.checkpoint.dist_ckpt import load_checkpoint
    from megatron_longact.config.schema import ModelConfig, ParallelConfig, TrainConfig
    from megatron_longact.models.gpt import build_gpt_model, make_transformer_config
    from megatron_longact.models.hf_config import parse_hf_config, read_hf_config
    from megatron_longact.models.hf_weights.mapping import padded_vocab_size

    arch = parse_hf_config(read_hf_config(hf_dir))
    padded = dataclasses.replace(arch, vocab_size=padded_vocab_size(arch.vocab_size, tp=tp))
    model_cfg = ModelConfig(hf_path=hf_dir)
    tconfig = make_transformer_config(
        padded,
        model=model_cfg,
        parallel=ParallelConfig(tensor_model_parallel_size=tp),
        train=TrainConfig(precision="fp32"),
    )
    gpt = build_gpt_model(padded, tconfig, model=model_cfg)
    load_checkpoint(ckpt.parent, model=[gpt], weights_only=True)
    gpt.eval()
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        local = gpt(input_ids=tokens, position_ids=positions, attention_mask=None)  # [b, s, V/tp]
    shards = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(shards, local, group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(shards, dim=-1)[..., : arch.vocab_size], gpt


def import_and_forward(models: list[dict], *, tp: int, root: str) -> dict:
    """Per rank: import every model at TP=``tp``, reload it, run it. At TP=2 also load one
    import through the training setup (DDP + optimizer) and save a training checkpoint."""
    from megatron_longact.convert.hf_import import import_hf_checkpoint

    results: dict = {"logits": {}, "ckpt": {}}
    for model in models:
        ckpt = import_hf_checkpoint(
            hf_dir=model["hf_dir"],
            out_dir=Path(root) / model["name"],
            tp=tp,
            show_progress=False,
        )
        results["ckpt"][model["name"]] = str(ckpt)
        if model["tokens"] is None:  # round-trip only
            continue
        logits, gpt = forward_from_checkpoint(
            hf_dir=model["hf_dir"], ckpt=ckpt, tokens=model["tokens"], tp=tp
        )
        results["logits"][model["name"]] = logits
        if tp == 2 and model["name"] == TRAIN_COMPAT_MODEL:
            results["train"] = through_training_setup(model["hf_dir"], ckpt, gpt, root=root)
    return results


def through_training_setup(hf_dir: str, ckpt: Path, gpt, *, root: str) -> dict:
    from megatron_longact.checkpoint.dist_ckpt import load_checkpoint, save_checkpoint
    from megatron_longact.config.loader import to_yaml
    from megatron_longact.config.schema import JobConfig, ModelConfig, ParallelConfig, TrainConfig
    from megatron_longact.runtime.distributed import init_distributed
    from megatron_longact.runtime.params import full_named_parameters
    from megatron_longact.runtime.setup import setup_train_state

    job = JobConfig(
        model=ModelConfig(hf_path=hf_dir),
        parallel=ParallelConfig(tensor_model_parallel_size=2),
        train=TrainConfig(precision="fp32"),
    )
    state = setup_train_state(job, init_distributed(job.parallel, seed=job.train.seed))
    load_checkpoint(ckpt.parent, model=state.model, weights_only=True)
    trained, imported = full_named_parameters(state.model[0]), full_named_parameters(gpt)
    same = sorted(trained) == sorted(imported) and all(
        torch.equal(trained[k], imported[k]) for k in trained
    )
    save_dir = Path(root) / "train_run"
    # Adam state exists only after a step, which would move the weights; fill it instead (as
    # load_checkpoint does) so the saved weights stay the imported ones.
    for inner in getattr(state.optimizer, "chained_optimizers", [state.optimizer]):
        inner._init_optimizer_states_with_dummy_values()
    saved = save_checkpoint(
        save_dir,
        step=7,
        model=state.model,
        optimizer=state.optimizer,
        scheduler=state.scheduler,
        config_yaml=to_yaml(job),
    )
    return {"same_params": same, "save_dir": str(save_dir), "ckpt": str(saved)}
