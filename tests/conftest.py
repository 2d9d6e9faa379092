"""Shared fixtures. Distributed tests spawn real gloo processes via runtime.launch.run_local."""

from __future__ import annotations

import os

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
