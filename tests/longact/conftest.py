"""Session fixtures: the spawned gloo worlds of the LongAct tests (longact_worlds.py), each run
once (a spawn costs ~10 s) and read by many tests: {probe name: [observation of each rank]}."""

from __future__ import annotations

import pytest
from longact_helpers import write_arch
from longact_worlds import Observations, world_dp2, world_single, world_tp2_dp2

from megatron_longact.runtime.launch import run_local


@pytest.fixture(scope="session")
def arch_dirs(tmp_path_factory) -> dict[str, str]:
    """Tiny Qwen3 variants: GQA, MHA with q/k/v bias, one KV group (G < TP), and one whose
    qkv weight straddles a DP shard boundary in the middle of a row (hidden 40)."""
    root = tmp_path_factory.mktemp("archs")
    return {
        "gqa": write_arch(root / "gqa", heads=4, groups=2, head_dim=16),
        "mha_bias": write_arch(root / "mha", heads=4, groups=4, head_dim=8, bias=True),
        "one_group": write_arch(root / "one", heads=4, groups=1, head_dim=16),
        "partial": write_arch(root / "partial", heads=4, groups=2, head_dim=16, hidden=40,
                              vocab=1024),
    }  # fmt: skip


@pytest.fixture(scope="session")
def single(arch_dirs, tmp_path_factory) -> Observations:
    folder = str(tmp_path_factory.mktemp("single"))
    return Observations(run_local(world_single, 1, arch_dirs, folder))


@pytest.fixture(scope="session")
def dp2(arch_dirs) -> Observations:
    return Observations(run_local(world_dp2, 2, arch_dirs))


@pytest.fixture(scope="session")
def tp2_dp2(arch_dirs) -> Observations:
    return Observations(run_local(world_tp2_dp2, 4, arch_dirs))
