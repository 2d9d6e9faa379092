"""Session fixture: the tiny Qwen3-MoE saved by transformers (once per session)."""

from __future__ import annotations

import moe_worlds as worlds
import pytest


@pytest.fixture(scope="session")
def tiny_moe(tmp_path_factory) -> worlds.TinyMoE:
    return worlds.save_tiny_moe(tmp_path_factory.mktemp("hf_moe") / "qwen3_moe")
