"""A tiny Hugging Face model folder saved by transformers itself, for tests and CPU smoke runs.

The cluster path starts from ``MODEL_PATH``, an HF folder (config.json, safetensors shards,
tokenizer). This writes one of the ``micro-qwen3`` preset's size with non-trivial random
weights (norms included, so a dropped or swapped tensor changes the logits) and the tiny
tokenizer, so CPU runs exercise the same HF -> megatron -> HF path as a real model.

    python tests/tiny_hf.py --out /tmp/tiny-hf [--seed 0] [--bf16]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from megatron_longact.data.tokenizer import TINY_TOKENIZER_DIR
from megatron_longact.models.hf_config import ASSETS_DIR

PRESET = "micro-qwen3"
WEIGHT_STD = 0.1
"""Std of the random weights: large enough that every tensor moves the logits."""
NORM_JITTER = 0.1
SHARD_SIZE = "50KB"
"""Several safetensors shards, so loading goes through the index as for a real model."""


def save_tiny_hf_model(
    out_dir: str | Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    preset_name: str = PRESET,
) -> Path:
    """Saves a random model of preset ``preset_name``'s size (``micro-qwen3``: a
    Qwen3ForCausalLM; ``micro-qwen3-moe``: a Qwen3MoeForCausalLM) in ``dtype`` and the tiny
    tokenizer into ``out_dir`` with ``save_pretrained``; returns the folder.

    The config keeps the preset's top-level ``rope_theta`` (as Hub checkpoints write it).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(out_dir)
    preset = json.loads((ASSETS_DIR / preset_name / "config.json").read_text())
    fields = {k: v for k, v in preset.items() if k not in ("architectures", "model_type")}
    fields.pop("torch_dtype", None)
    torch.manual_seed(seed)
    config = AutoConfig.for_model(preset["model_type"], **fields)
    model = AutoModelForCausalLM.from_config(config).float()
    randomize_(model)
    model.to(dtype).save_pretrained(out, safe_serialization=True, max_shard_size=SHARD_SIZE)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("rope_parameters", None)
    config["rope_theta"] = preset["rope_theta"]
    config_path.write_text(json.dumps(config, indent=2))
    for file in TINY_TOKENIZER_DIR.iterdir():
        shutil.copy2(file, out / file.name)
    return out


@torch.no_grad()
def randomize_(model: torch.nn.Module) -> None:
    """Non-trivial random weights in place: norms 1 +- NORM_JITTER, the rest N(0, WEIGHT_STD)
    (the global torch seed decides them)."""
    for name, param in model.named_parameters():
        if "norm" in name:
            param.copy_(1.0 + NORM_JITTER * torch.randn_like(param))
        else:
            param.normal_(0.0, WEIGHT_STD)


def load_hf_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF folder's safetensors files, by HF name (small models only)."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def transformers_sft_loss(hf_dir: str | Path, job) -> float:
    """transformers' fp32 loss on the first global batch that ``longact sft`` with ``job``
    (a :class:`~megatron_longact.config.JobConfig`) trains on: every packed sample on its own
    (block-causal attention and per-sample positions make packed samples independent), loss
    tokens summed / their count, as megatron's per-token loss normalises."""
    from transformers import AutoModelForCausalLM

    from megatron_longact.runtime.batches import global_batch_indices
    from megatron_longact.sft.data import load_sft_data

    bins = load_sft_data(job.data).train_bins
    order = global_batch_indices(
        len(bins),
        batch_size=job.data.global_batch_size,
        consumed=0,
        seed=job.train.seed,
        shuffle=job.data.shuffle,
    )
    model = AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="eager"
    )
    total, count = 0.0, 0.0
    with torch.no_grad():
        for packed in (bins[i] for i in order):
            cu = packed.cu_seqlens.tolist()
            for start, end in zip(cu[: packed.num_samples], cu[1 : packed.num_samples + 1]):
                logits = model(input_ids=packed.tokens[None, start:end]).logits[0]
                losses = torch.nn.functional.cross_entropy(
                    logits, packed.labels[start:end], reduction="none"
                )
                mask = packed.loss_mask[start:end]
                total += float((losses * mask).sum())
                count += float(mask.sum())
    return total / count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write (created)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true", help="store the weights in bf16")
    parser.add_argument("--preset", default=PRESET, help="micro-qwen3 or micro-qwen3-moe")
    args = parser.parse_args(argv)
    folder = save_tiny_hf_model(
        args.out,
        seed=args.seed,
        dtype=torch.bfloat16 if args.bf16 else torch.float32,
        preset_name=args.preset,
    )
    print(f"wrote {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
