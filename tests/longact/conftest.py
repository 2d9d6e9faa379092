"""Session fixtures: the spawned gloo worlds of the LongAct tests, each run once.

Every world (longact_worlds.py) batches many checks (a spawn costs ~10 s) and returns one
frozen dataclass per rank; the tests assert on their fields.
"""

from __future__ import annotations

import longact_helpers as helpers
import longact_worlds as worlds
import pytest

from megatron_longact.runtime.launch import run_local


@pytest.fixture(scope="session")
def arch_dirs(tmp_path_factory) -> dict[str, str]:
    """Tiny Qwen3 variants: GQA, MHA with q/k/v bias, one KV group (G < TP), and one whose
    qkv weight straddles a DP shard boundary in the middle of a row (hidden 40)."""
    root = tmp_path_factory.mktemp("archs")
    return {
        "gqa": helpers.write_arch(root / "gqa", heads=4, groups=2, head_dim=16),
        "mha_bias": helpers.write_arch(root / "mha", heads=4, groups=4, head_dim=8, bias=True),
        "one_group": helpers.write_arch(root / "one", heads=4, groups=1, head_dim=16),
        "partial": helpers.write_arch(
            root / "partial", heads=4, groups=2, head_dim=16, hidden=40, vocab=1024
        ),
    }


@pytest.fixture(scope="session")
def single(arch_dirs, tmp_path_factory) -> worlds.SingleWorld:
    return run_local(worlds.world_single, 1, arch_dirs, str(tmp_path_factory.mktemp("single")))[0]


@pytest.fixture(scope="session")
def dp2(arch_dirs) -> list[worlds.DP2World]:
    return run_local(worlds.world_dp2, 2, arch_dirs)


@pytest.fixture(scope="session")
def tp2_dp2(arch_dirs) -> list[worlds.TP2DP2World]:
    return run_local(worlds.world_tp2_dp2, 4, arch_dirs)
