"""Launching: N local gloo processes running one function (tests, benchmarks, CPU tools), and
torchrun with one-line errors and exit codes passed through (cluster jobs).

``python -m megatron_longact.runtime.launch <torchrun arguments>`` is torchrun (same flags)
with three differences, because torchrun turns every worker failure into exit status 1 and a
ChildFailedError report, and ends its workers itself on a stop signal:

- a worker's user error (exit 2): the one line the first failed rank left in its error file
  is printed once (workers under torchrun print none themselves), without torchrun's report;
- workers that stopped on a signal and saved (exit 75, ``STOP_EXIT_CODE``): exit 75, quietly;
- SIGTERM, SIGINT and SIGUSR1 are forwarded to the workers, and the launcher waits for them
  to save and exit instead of killing them after a grace period (Slurm's KillWait still
  bounds it).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from megatron_longact.runtime.distributed import free_port
from megatron_longact.runtime.lifetime import STOP_SIGNALS, die_with_parent

# Exit status of a user error (bad config, data, paths): the CLI's argparse-style code.
USER_ERROR_EXIT = 2


def _worker(rank: int, world_size: int, port: int, out_dir: str, fn: Callable, args, kwargs):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    # torch's spawn sends its children SIGINT when the parent dies, which our stop handler
    # would turn into "save after this step"; an orphaned rank should just go.
    die_with_parent(sig=signal.SIGKILL)
    result_path = Path(out_dir) / f"rank{rank}.pt"
    try:
        result = fn(*args, **kwargs)
        torch.save({"ok": True, "result": result}, result_path)
    except BaseException as err:  # report every failure to the parent, then die
        torch.save({"ok": False, "error": f"{err!r}\n{traceback.format_exc()}"}, result_path)
        raise
    finally:
        from megatron_longact.runtime.distributed import shutdown

        shutdown()


def run_local(fn: Callable, world_size: int, *args: Any, **kwargs: Any) -> list[Any]:
    """Runs ``fn(*args, **kwargs)`` in ``world_size`` spawned processes; returns their results.

    ``fn`` must be importable (module level) and call ``init_distributed`` itself; results must
    be picklable (move tensors to CPU). Raises RuntimeError with the failing rank's traceback.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        port = free_port()
        error = None
        try:
            mp.start_processes(
                _worker,
                args=(world_size, port, out_dir, fn, args, kwargs),
                nprocs=world_size,
                join=True,
                start_method="spawn",
            )
        except Exception as err:  # the per-rank files say more than the ProcessExitedException
            error = err
        results, failures = [], []
        for rank in range(world_size):
            path = Path(out_dir) / f"rank{rank}.pt"
            if not path.exists():
                failures.append(f"rank {rank} wrote no result ({error!r})")
                continue
            payload = torch.load(path, weights_only=False)
            if payload["ok"]:
                results.append(payload["result"])
            else:
                failures.append(f"rank {rank} failed:\n{payload['error']}")
        if failures:
            # A rank that crashed makes its peers fail with "Connection closed"; show the cause.
            failures.sort(key=lambda text: "Connection closed" in text)
            raise RuntimeError(failures[0])
        if error is not None:
            raise RuntimeError(f"a rank failed: {error!r}")
        return results


def write_error_file(message: str) -> bool:
    """Writes ``message`` where torchrun collects this worker's error (TORCHELASTIC_ERROR_FILE,
    the JSON layout of torch.distributed.elastic's ``ProcessFailure``). False outside
    torchrun."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return False
    Path(path).write_text(json.dumps({"message": message, "timestamp": int(time.time())}))
    return True


def _children() -> list[int]:
    pids = []
    for task in Path("/proc/self/task").iterdir():
        try:
            pids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return pids


def _forward(signum, _frame) -> None:
    # Workers run in their own sessions (torch elastic's SubprocessHandler uses
    # start_new_session), so a terminal's Ctrl-C reaches only this process.
    for pid in _children():
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _stopped_and_saved(codes: set[int], stop_code: int) -> bool:
    """Whether workers' exit codes mean "stopped on a signal with a complete checkpoint".

    A worker exits ``stop_code`` only after the save's last barrier (``checkpoint.dist_ckpt``
    ends every save with one, after ``latest`` names the new folder), so one such exit proves
    the checkpoint is whole. Its peers may still be tearing down when torchrun's agent sees
    that exit: the agent then ends them with SIGTERM (torch/distributed/elastic/agent/server/
    api.py:954 in torch 2.13, ``_invoke_run``: a FAILED group goes to ``_stop_workers``), and they report
    ``-15``. Such a kill loses nothing, so it counts as stopped too.
    """
    return stop_code in codes and all(code == stop_code or code < 0 for code in codes)


def torchrun_main(argv: list[str] | None = None) -> int:
    """torchrun with one-line errors, exit codes passed through and stop signals forwarded.

    Returns 0 (every worker finished), ``STOP_EXIT_CODE`` (workers stopped on a signal and
    saved), 2 (a user error; printed once), else the first failed worker's exit status
    after torchrun's failure report.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from megatron_longact.runtime.signals import STOP_EXIT_CODE

    args = parse_args(argv)
    # The agent handles the other signals as usual; the stop signals are ours to forward.
    stop_names = {signal.Signals(s).name for s in STOP_SIGNALS}
    kept = [n for n in args.signals_to_handle.split(",") if n.strip() not in stop_names]
    args.signals_to_handle = ",".join(kept) or "SIGHUP"
    for sig in STOP_SIGNALS:
        signal.signal(sig, _forward)
    # "failed (exitcode: 2)" and "Sending process ... closing signal" would repeat the error.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(args)
        return 0
    except ChildFailedError as err:
        failures = sorted(err.failures.items())
        codes = {failure.exitcode for _, failure in failures}
        if _stopped_and_saved(codes, STOP_EXIT_CODE):
            print(f"longact: stopped on a signal after saving a checkpoint (exit "
                  f"{STOP_EXIT_CODE}); run again to resume", file=sys.stderr)  # fmt: skip
            return STOP_EXIT_CODE
        users = [f for _, f in failures if f.exitcode == USER_ERROR_EXIT and f.message]
        if users:
            print(f"longact: error: {users[0].message}", file=sys.stderr)
            return USER_ERROR_EXIT
        print(err.format_msg(), file=sys.stderr)
        code = failures[0][1].exitcode
        return code if code > 0 else 128 - code  # a signal -N exits 128+N, as a shell does


if __name__ == "__main__":
    sys.exit(torchrun_main())
