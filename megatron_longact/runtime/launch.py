"""Start N local gloo processes running one function (tests, benchmarks, CPU tools).

Cluster jobs use torchrun or srun instead; this is for a single machine without a launcher.
"""

from __future__ import annotations

import os
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from megatron_longact.runtime.distributed import free_port


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
