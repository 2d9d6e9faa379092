"""Fixtures for the real-model tests: SmolLM2-135M-Instruct from the ``[realmodel]`` extra.

Everything skips, with the install command, when the extra is missing. Set
``LONGACT_SMOLLM2_DIR`` to a folder made by ``longact import-gguf`` to skip the import.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


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
