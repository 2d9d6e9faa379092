"""Graceful stop: SIGUSR1/SIGTERM (Slurm's time-limit warning, preemption) -> checkpoint, exit.

The handler only sets a flag; loops ask :meth:`StopRequest.agreed` at step boundaries, which
all-reduces the flag so every rank stops after the same step and saves together.
"""

from __future__ import annotations

import logging
import signal

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    """Installs handlers for ``STOP_SIGNALS`` (main thread only) and reports agreed stops."""

    def __init__(self) -> None:
        self.requested = False
        _start_checkpoint_writer_queue()
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        logger.warning("received %s: will checkpoint and stop after this step",
                       signal.Signals(signum).name)  # fmt: skip
        self.requested = True

    def agreed(self) -> bool:
        """True on every rank when any rank got a stop signal. All ranks must call it."""
        flag = torch.tensor([1.0 if self.requested else 0.0])
        if torch.cuda.is_available():
            flag = flag.cuda()
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _start_checkpoint_writer_queue() -> None:
    """Spawns megatron's checkpoint-writer results queue now, with the stop signals ignored.

    The torch_dist writer passes results through a ``multiprocessing`` Manager that it spawns
    on the first save and keeps. Stop signals reach the whole process group (torchrun's
    ``killpg``, Slurm's step signal), and a fresh interpreter dies of SIGUSR1, so the save the
    stop asked for failed with BrokenPipeError. Ignored signals stay ignored across exec.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        filesystem_async._get_write_results_queue()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
