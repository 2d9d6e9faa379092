"""Filesystem faults found before step 1 or failing cleanly: read-only output folders, a full
disk (a small tmpfs), a file-size limit (``ulimit -f``), a ``latest`` outside save_dir."""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import signal
import subprocess
from pathlib import Path

import pytest
from fault_helpers import run_cli, sft_args, trajectory

from megatron_longact.checkpoint import latest_checkpoint
from megatron_longact.checkpoint.preflight import check_room, check_writable


@contextlib.contextmanager
def read_only(folder: Path):
    """``folder`` made read-only for this process: a read-only bind mount as root (root
    ignores permission bits), chmod 555 otherwise. Skips when neither is possible."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    bind = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True)
    if bind.returncode != 0:
        pytest.skip(f"cannot bind-mount as root here: {bind.stderr.decode().strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], check=True)
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=False)


@contextlib.contextmanager
def small_tmpfs(folder: Path, size_bytes: int):
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs",
                              str(folder)], capture_output=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_preflight_names_a_read_only_folder(tmp_path):
    with read_only(tmp_path / "ro"):
        with pytest.raises(PermissionError, match=r"logging.tensorboard_dir=.*ro.* not writable"):
            check_writable(tmp_path / "ro" / "tb", field="logging.tensorboard_dir")


def test_preflight_refuses_a_filesystem_without_room(tmp_path):
    with pytest.raises(OSError, match="GiB free, one checkpoint needs about") as err:
        check_room(tmp_path, needed=1 << 60)
    assert err.value.errno == errno.ENOSPC
    check_room(tmp_path, needed=1)


def test_latest_pointing_into_another_run_is_refused(tmp_path):
    other = tmp_path / "other_run" / "ckpt" / "iter_0000008"
    other.mkdir(parents=True)
    (other / "metadata.json").write_text("{}")
    mine = tmp_path / "my_run" / "ckpt"
    mine.mkdir(parents=True)
    for pointer in (str(other), "../../other_run/ckpt/iter_0000008"):
        (mine / "latest").write_text(pointer + "\n")
        with pytest.raises(ValueError, match="not an iter_\\* folder inside"):
            latest_checkpoint(mine)
    (mine / "iter_0000008").symlink_to(other)  # a symlinked folder is another run's too
    (mine / "latest").write_text("iter_0000008\n")
    with pytest.raises(ValueError, match="resumes only its own saves"):
        latest_checkpoint(mine)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["save_dir", "tensorboard_dir"])
def test_read_only_output_dir_fails_before_step_1(baseline, tmp_path, which):
    run_dir = tmp_path / "run"
    target = run_dir / ("ckpt" if which == "save_dir" else "tb")
    with read_only(target):
        done = run_cli(sft_args(baseline.data_dir, run_dir))
    assert done.returncode == 2, done.stderr[-3000:]
    (line,) = done.error_lines()
    assert "not writable" in line and str(target) in line
    assert "Traceback" not in done.stderr
    assert trajectory(run_dir) == {}  # no step was spent


def _checkpoint_bytes(ckpt: Path) -> int:
    return sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())


@pytest.mark.slow
def test_full_disk_names_enospc_and_keeps_latest_on_the_previous_save(baseline, tmp_path):
    one = _checkpoint_bytes(baseline.ckpt / "iter_0000002")
    # Room for one checkpoint and a half: preflight passes, the second save runs out.
    with small_tmpfs(tmp_path / "small", int(one * 1.6)) as small:
        args = sft_args(baseline.data_dir, tmp_path, f"checkpoint.save_dir={small / 'ckpt'}")
        done = run_cli(args)
        assert done.returncode == 2, done.stderr[-3000:]
        (line,) = done.error_lines()
        assert "ENOSPC" in line and "still names iter_0000002" in line, line
        # megatron logs the writer's raw error ("unexpected pos ..."); ours is the last line.
        assert "Traceback" not in done.stderr and done.stderr.strip().endswith(line[-60:])
        assert (small / "ckpt" / "latest").read_text().strip() == "iter_0000002"
        assert not list((small / "ckpt").glob("*.tmp"))
        assert latest_checkpoint(small / "ckpt").name == "iter_0000002"


def _file_size_limit(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes fail with EFBIG, as ENOSPC would
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.slow
def test_file_size_limit_fails_the_save_cleanly(baseline, tmp_path):
    shard = (baseline.ckpt / "iter_0000002" / "__0_0.distcp").stat().st_size
    done = run_cli(sft_args(baseline.data_dir, tmp_path), preexec_fn=_file_size_limit(shard // 2))
    assert done.returncode == 2, done.stderr[-3000:]
    (line,) = done.error_lines()
    assert "ENOSPC" in line and "no earlier save exists" in line, line
    assert not (tmp_path / "ckpt" / "latest").exists()
    assert not list((tmp_path / "ckpt").glob("*.tmp"))
