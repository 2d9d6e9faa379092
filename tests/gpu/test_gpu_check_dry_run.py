"""The GPU check's dry run (CI has no GPU): arguments and the result schema."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

GPU_DIR = Path(__file__).parent


def test_dry_run_writes_a_valid_result(tmp_path):
    subprocess.run(["bash", str(GPU_DIR / "run_gpu_check.sh"), str(tmp_path), "--dry-run"],
                   check=True)  # fmt: skip
    from gpu_check import STAGE_NAMES, TOTAL_BUDGET_S, validate_result

    result = json.loads((tmp_path / "gpu_check.json").read_text())
    validate_result(result)
    assert result["dry_run"] is True and result["budget_s"] == TOTAL_BUDGET_S < 8 * 60
    assert [result["stages"][n]["status"] for n in STAGE_NAMES] == ["skipped"] * len(STAGE_NAMES)
    assert (tmp_path / "gpu_check.log").is_file()


def test_unknown_stage_is_a_one_line_error(tmp_path):
    proc = subprocess.run(["python", str(GPU_DIR / "gpu_check.py"), "--out", str(tmp_path),
                           "--dry-run", "--stages", "sft_tiny,bogus"],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2 and "unknown ['bogus']" in proc.stderr


def test_validate_rejects_an_ok_stage_with_a_failed_check():
    from gpu_check import result_skeleton, validate_result

    result = result_skeleton(dry_run=False)
    result["stages"]["sft_tiny"].update(status="ok", checks={"falls": False})
    with pytest.raises(ValueError, match="failed check"):
        validate_result(result)


def test_stage_budgets_fit_the_lease():
    from gpu_check import STAGES, TOTAL_BUDGET_S

    assert sum(s.budget_s for s in STAGES) <= TOTAL_BUDGET_S


def test_skip_leaves_a_stage_out(tmp_path):
    from gpu_check import STAGE_NAMES

    subprocess.run(["python", str(GPU_DIR / "gpu_check.py"), "--out", str(tmp_path), "--dry-run",
                    "--skip", "rl_packing"], check=True)  # fmt: skip
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert "rl_packing" in STAGE_NAMES and result["stages"]["rl_packing"]["status"] == "skipped"
