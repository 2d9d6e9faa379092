"""Shared fixtures. Distributed tests spawn real gloo processes via runtime.launch.run_local."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory):
    """A small synthetic SFT/RL data set (the quickstart task) made with the tiny tokenizer."""
    from megatron_longact.data.make_synthetic import main

    out = tmp_path_factory.mktemp("synthetic")
    main(["--out-dir", str(out), "--context-tokens", "96", "--sft-train", "48", "--sft-val",
          "8", "--rl-train", "16", "--rl-val", "8", "--seed", "7"])  # fmt: skip
    return out


# SmolLM2-135M-Instruct from the ``[realmodel]`` extra, for tests/realmodel and tests/study: one
# import per session (~40 s). Everything skips, with the install command, when the extra is
# missing; set ``LONGACT_SMOLLM2_DIR`` to a folder made by ``longact import-gguf`` to skip the
# import.


def _skip_without_extra() -> None:
    from megatron_longact.study.gguf_import import realmodel_missing

    reason = realmodel_missing()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as an HF folder (fp32 safetensors + tokenizer), imported once."""
    reused = os.environ.get("LONGACT_SMOLLM2_DIR")
    if reused:
        return Path(reused)
    _skip_without_extra()
    from megatron_longact.study.gguf_import import import_gguf, smollm2_gguf_path

    return import_gguf(smollm2_gguf_path(), tmp_path_factory.mktemp("smollm2") / "hf")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2's own tokenizer (and chat template), read from the GGUF file: no weight import."""
    from transformers import AutoTokenizer

    reused = os.environ.get("LONGACT_SMOLLM2_DIR")
    if reused:
        return AutoTokenizer.from_pretrained(reused, local_files_only=True)
    _skip_without_extra()
    from megatron_longact.study.gguf_import import smollm2_gguf_path

    path = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
