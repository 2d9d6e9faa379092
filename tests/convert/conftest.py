"""Session fixtures: tiny HF models saved once, and the TP=1 / TP=2 import worlds."""

from __future__ import annotations

import shutil

import convert_worlds as worlds
import pytest

from megatron_longact.data.tokenizer import TINY_TOKENIZER_DIR
from megatron_longact.runtime.launch import run_local


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, worlds.TinyModel]:
    root = tmp_path_factory.mktemp("hf")
    models = {}
    for seed, name in enumerate(worlds.VARIANTS):
        models[name] = worlds.save_tiny(name, root / name, seed=seed)
    # One model ships a tokenizer, as Hub folders do; export must carry it over.
    for file in TINY_TOKENIZER_DIR.iterdir():
        shutil.copy2(file, root / "qwen3_tied" / file.name)
    return models


@pytest.fixture(scope="session")
def bf16_model(tiny_models, tmp_path_factory):
    """qwen3_untied stored in bf16 (import keeps bf16; export must give the same bits)."""
    folder = tmp_path_factory.mktemp("hf_bf16") / worlds.BF16_MODEL
    worlds.save_as_bf16(tiny_models["qwen3_untied"].hf_dir, folder)
    return folder


@pytest.fixture(scope="session")
def worlds_by_tp(tiny_models, bf16_model, tmp_path_factory) -> dict[int, dict]:
    """{tp: what rank 0 of the import world returned} for TP=1 and TP=2."""
    specs = [
        {"name": m.name, "hf_dir": str(m.hf_dir), "tokens": m.tokens} for m in tiny_models.values()
    ]
    out = {}
    for tp in (1, 2):
        root = str(tmp_path_factory.mktemp(f"mcore_tp{tp}"))
        extra = [{"name": worlds.BF16_MODEL, "hf_dir": str(bf16_model), "tokens": None}]
        out[tp] = run_local(
            worlds.import_and_forward, tp, specs + (extra if tp == 1 else []), tp=tp, root=root
        )[0]
    return out
