"""kill -9 at random points (including mid-save), then resume: the trajectory equals the
uninterrupted run exactly, no existing checkpoint changes, and no helper process survives."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
from fault_helpers import (
    SAVE_INTERVAL,
    STEPS,
    kill_tagged,
    new_tag,
    orphans_after,
    record_figure,
    run_cli,
    sft_args,
    start_cli,
    steps_logged,
    trajectory,
    wait_until,
)

NUM_KILLS = 4
SEED = 11


def _complete_saves(ckpt_dir):
    return {p.name: {f.name: f.stat().st_mtime_ns for f in p.rglob("*") if f.is_file()}
            for p in ckpt_dir.glob("iter_*") if not p.name.endswith(".tmp")}  # fmt: skip


@pytest.mark.slow
def test_kill9_at_random_points_then_resume_is_exact_and_leaves_no_orphans(baseline, tmp_path):
    rng = random.Random(SEED)
    kills, identical, orphans_left, during_save = 0, 0, 0, 0
    for attempt in range(NUM_KILLS):
        run_dir = tmp_path / f"run{attempt}"  # each run starts fresh, killed at another point
        ckpt_dir = run_dir / "ckpt"
        tag = new_tag()
        process = start_cli(sft_args(baseline.data_dir, run_dir), tag=tag)
        try:
            if attempt % 2 == 0:  # during a save: soon after its .tmp folder appears
                # Attempt 0 kills inside the first save (~1.7 s on the CI machine: the
                # checkpointer's first-call setup), attempt 2 within 30 ms of a later one's
                # start (those take ~0.1 s there). With any save and a 0-0.3 s delay, both
                # kills once came after their save had finished.
                if attempt == 0:
                    step, delay = SAVE_INTERVAL, rng.uniform(0.0, 0.3)
                else:
                    later = range(2 * SAVE_INTERVAL, STEPS + 1, SAVE_INTERVAL)
                    step, delay = rng.choice(later), rng.uniform(0.0, 0.03)
                tmp = ckpt_dir / f"iter_{step:07d}.tmp"
                wait_until(tmp.exists, timeout=300, what=f"save {step} in progress",
                           process=process, poll=0.002)  # fmt: skip
                time.sleep(delay)
                during_save += tmp.exists()
            else:  # at a random moment of a random step
                step = rng.randrange(1, STEPS)
                wait_until(lambda d=run_dir, s=step: steps_logged(d) >= s, timeout=300,
                           what=f"step {step}", process=process)  # fmt: skip
                time.sleep(rng.uniform(0.0, 2.0))
            saves = _complete_saves(ckpt_dir)
            os.kill(process.pid, signal.SIGKILL)
            process.communicate(timeout=60)
            kills += 1
            left = orphans_after(tag)
            orphans_left += len(left)
            assert left == [], f"kill {attempt} (near step {step}): {len(left)} orphans"
            # The kill changed no complete checkpoint (a half-written .tmp may remain).
            after = _complete_saves(ckpt_dir)
            assert {k: after[k] for k in saves} == saves
        finally:
            kill_tagged(tag)
        resumed = run_cli(sft_args(baseline.data_dir, run_dir))
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        identical += trajectory(run_dir) == baseline.trajectory
    record_figure("kill9_resume", killed=kills, killed_during_save=during_save,
                  resumed_identically=identical, orphans_left=orphans_left)  # fmt: skip
    assert identical == kills == NUM_KILLS
    assert during_save >= 1
