"""Helpers of the fault-injection suite: real CLI processes, real signals, real filesystems.

Every process a test starts carries ``LONGACT_FAULT_TAG=<uuid>`` in its environment; children
inherit it, so :func:`tagged_processes` finds whatever a killed trainer left behind (megatron's
checkpoint-writer Manager, the resource_tracker, forked writers) wherever it was reparented.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

TAG_VAR = "LONGACT_FAULT_TAG"
STEPS = 6
SAVE_INTERVAL = 2
RUN_TIMEOUT_S = 600
# What a figure of the suite is compared on, exactly (a resumed run must equal the baseline).
TRAJECTORY_KEYS = ("train/loss", "train/grad_norm", "train/lr")


def sft_args(data_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    """``longact sft`` arguments of the suite's run: micro model, 6 steps, saves every 2."""
    return [
        "sft",
        "model.preset=micro-qwen3",
        f"data.train_path={data_dir / 'sft_train.jsonl'}",
        "data.seq_length=256",
        "data.micro_batch_size=2",
        "data.global_batch_size=4",
        "optim.lr=2e-3",
        "optim.warmup_steps=1",
        f"train.train_steps={STEPS}",
        f"checkpoint.save_dir={run_dir / 'ckpt'}",
        f"checkpoint.save_interval={SAVE_INTERVAL}",
        "checkpoint.keep_last=10",
        f"logging.tensorboard_dir={run_dir / 'tb'}",
        "logging.progress=false",
        *extra,
    ]


def new_tag() -> str:
    return uuid.uuid4().hex


def env_with(tag: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    env[TAG_VAR] = tag
    env.pop("LONGACT_DEBUG", None)
    return env


def start_cli(
    args: list[str], *, tag: str, launcher: list[str] | None = None, **popen
) -> subprocess.Popen:
    """Starts ``python -m megatron_longact.cli ARGS`` (or under ``launcher``) in the background."""
    cmd = [sys.executable, *(launcher or []), "-m", "megatron_longact.cli", *args]
    return subprocess.Popen(cmd, env=env_with(tag), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)  # fmt: skip


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str

    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("longact: error")]


def run_cli(args: list[str], *, tag: str | None = None, launcher: list[str] | None = None,
            timeout: float = RUN_TIMEOUT_S, **popen) -> Finished:  # fmt: skip
    process = start_cli(args, tag=tag or new_tag(), launcher=launcher, **popen)
    out, err = process.communicate(timeout=timeout)
    return Finished(process.returncode, out, err)


def trajectory(run_dir: Path) -> dict[int, tuple[float, ...]]:
    """{step: (loss, grad_norm, lr)} from metrics.jsonl; a step logged twice (redone after a
    resume) keeps its last record."""
    path = run_dir / "tb" / "metrics.jsonl"
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            out[record["step"]] = tuple(record[k] for k in TRAJECTORY_KEYS)
    return out


def tagged_processes(tag: str) -> list[int]:
    """Pids of live processes whose environment holds ``LONGACT_FAULT_TAG=tag``."""
    needle = f"{TAG_VAR}={tag}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":  # a zombie is already dead, only not yet reaped
                    pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def orphans_after(tag: str, *, settle_s: float = 10.0) -> list[int]:
    """Processes still alive ``settle_s`` after the trainer died (0 expected: parent-death
    signals are immediate, the resource_tracker exits when its pipe closes)."""
    deadline = time.monotonic() + settle_s
    while (left := tagged_processes(tag)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def kill_tagged(tag: str) -> None:
    """Cleanup after a failed test: SIGKILL whatever carries ``tag`` (only our processes)."""
    for pid in tagged_processes(tag):
        try:
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_until(
    predicate,
    *,
    timeout: float,
    what: str,
    process: subprocess.Popen | None = None,
    poll: float = 0.05,
):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if process is not None and process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"process ended (exit {process.returncode}) before {what}:\n"
                                 f"{err[-3000:]}")  # fmt: skip
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def steps_logged(run_dir: Path) -> int:
    path = run_dir / "tb" / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def record_figure(name: str, **values) -> None:
    """Appends one JSON line of measured figures to ``$LONGACT_FAULT_REPORT`` (when set) and
    prints it (``pytest -s`` shows it): what the README's reliability section quotes."""
    line = json.dumps({"figure": name, **values})
    print(line)
    report = os.environ.get("LONGACT_FAULT_REPORT")
    if report:
        with open(report, "a") as handle:
            handle.write(line + "\n")
