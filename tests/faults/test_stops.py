"""Stops: Ctrl-C (SIGINT) saves like SIGTERM/USR1 and exits 75, distinct from a finished run
(0); under the launcher the code comes through; a stalled (SIGSTOPped) rank ends the job after
``parallel.collective_timeout_s`` instead of torch's 30 minutes."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from fault_helpers import (
    kill_tagged,
    new_tag,
    orphans_after,
    run_cli,
    sft_args,
    start_cli,
    steps_logged,
    trajectory,
    wait_until,
)

from megatron_longact.checkpoint import latest_checkpoint
from megatron_longact.runtime.distributed import free_port
from megatron_longact.runtime.signals import STOP_EXIT_CODE

STALL_TIMEOUT_S = 10


def _launcher(nproc: int) -> list[str]:
    return ["-m", "megatron_longact.runtime.launch", "--nnodes=1", f"--nproc-per-node={nproc}",
            "--master-addr=127.0.0.1", f"--master-port={free_port()}"]  # fmt: skip


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(p) for p in (task / "children").read_text().split()]
    return out


@pytest.mark.slow
def test_sigint_saves_exits_75_and_resumes_exactly(baseline, tmp_path):
    tag = new_tag()
    process = start_cli(sft_args(baseline.data_dir, tmp_path), tag=tag)
    try:
        wait_until(lambda: steps_logged(tmp_path) >= 1, timeout=300, what="step 1",
                   process=process)  # fmt: skip
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=300)
        assert process.returncode == STOP_EXIT_CODE, err[-3000:]
        assert "received SIGINT" in err and "KeyboardInterrupt" not in err
        stopped = latest_checkpoint(tmp_path / "ckpt")
        assert stopped is not None and int(stopped.name[5:]) == max(trajectory(tmp_path))
        assert orphans_after(tag) == []
    finally:
        kill_tagged(tag)
    resumed = run_cli(sft_args(baseline.data_dir, tmp_path))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert trajectory(tmp_path) == baseline.trajectory


@pytest.mark.slow
def test_sigterm_through_the_launcher_exits_75_with_a_checkpoint(baseline, tmp_path):
    tag = new_tag()
    args = sft_args(baseline.data_dir, tmp_path, "train.train_steps=40")
    process = start_cli(args, tag=tag, launcher=_launcher(2))
    try:
        wait_until(lambda: steps_logged(tmp_path) >= 1, timeout=300, what="step 1",
                   process=process)  # fmt: skip
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=300)
        assert process.returncode == STOP_EXIT_CODE, err[-3000:]
        assert err.count("received SIGTERM") == 2  # both ranks, forwarded by the launcher
        assert "ChildFailedError" not in err and "Traceback" not in err
        assert latest_checkpoint(tmp_path / "ckpt") is not None
        assert orphans_after(tag) == []
    finally:
        kill_tagged(tag)


@pytest.mark.slow
def test_stalled_rank_ends_the_job_after_the_collective_timeout(baseline, tmp_path):
    tag = new_tag()
    args = sft_args(baseline.data_dir, tmp_path, "train.train_steps=40",
                    f"parallel.collective_timeout_s={STALL_TIMEOUT_S}")  # fmt: skip
    process = start_cli(args, tag=tag, launcher=_launcher(2))
    try:
        wait_until(lambda: steps_logged(tmp_path) >= 1, timeout=300, what="step 1",
                   process=process)  # fmt: skip
        workers = _children(process.pid)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGSTOP)
        stalled_at = time.monotonic()
        _, err = process.communicate(timeout=600)
        held_s = time.monotonic() - stalled_at
        assert process.returncode not in (0, STOP_EXIT_CODE), err[-3000:]
        assert "a collective timed out (parallel.collective_timeout_s)" in err, err[-3000:]
        # The timeout plus torchrun's shutdown of the stopped worker, not 30 minutes.
        assert held_s < 10 * STALL_TIMEOUT_S, held_s
        print(f"stalled rank held the job {held_s:.0f} s (timeout {STALL_TIMEOUT_S} s)")
        assert orphans_after(tag) == []
    finally:
        kill_tagged(tag)


@pytest.mark.parametrize(
    ("codes", "stopped"),
    [
        ({STOP_EXIT_CODE}, True),
        # CI, 2026-12-01: rank 1 exited 75 first, torchrun's agent then ended rank 0 (already
        # past the save's last barrier, tearing down) with SIGTERM.
        ({STOP_EXIT_CODE, -signal.SIGTERM}, True),
        ({STOP_EXIT_CODE, -signal.SIGKILL}, True),
        ({STOP_EXIT_CODE, 1}, False),  # a rank that crashed: not a clean stop
        ({-signal.SIGTERM}, False),  # nobody finished a save
        ({1, -signal.SIGTERM}, False),  # the stalled-rank case above
    ],
)
def test_launcher_counts_a_stop_whose_peers_torchrun_ended(codes, stopped):
    from megatron_longact.runtime.launch import _stopped_and_saved

    assert _stopped_and_saved({int(c) for c in codes}, STOP_EXIT_CODE) is stopped
