"""The fault suite's baseline: one uninterrupted CLI run whose trajectory and checkpoints every
fault is compared against."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fault_helpers import run_cli, sft_args, trajectory  # noqa: E402


@dataclass(frozen=True)
class Baseline:
    data_dir: Path
    run_dir: Path
    trajectory: dict[int, tuple[float, ...]]

    @property
    def ckpt(self) -> Path:
        return self.run_dir / "ckpt"


@pytest.fixture(scope="session")
def baseline(synthetic_data_dir, tmp_path_factory) -> Baseline:
    run_dir = tmp_path_factory.mktemp("baseline")
    done = run_cli(sft_args(synthetic_data_dir, run_dir))
    assert done.returncode == 0, done.stderr[-4000:]
    return Baseline(synthetic_data_dir, run_dir, trajectory(run_dir))
