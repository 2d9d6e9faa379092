"""Graceful stop: SIGUSR1/SIGTERM (Slurm's time-limit warning, preemption) and SIGINT
(Ctrl-C) -> checkpoint, exit with :data:`STOP_EXIT_CODE`.

The handler only sets a flag; loops ask :meth:`StopRequest.agreed` at step boundaries, which
all-reduces the flag so every rank stops after the same step and saves together. A second
Ctrl-C does not wait for the step to end: it raises KeyboardInterrupt (exit 130, no save).
"""

from __future__ import annotations

import logging
import signal
import time

import torch
import torch.distributed as dist

from megatron_longact.device import current_device
from megatron_longact.runtime.lifetime import STOP_SIGNALS, start_checkpoint_writer_queue

logger = logging.getLogger(__name__)

# Exit status of a run that stopped on a signal after saving a checkpoint, to be resumed by
# running it again: EX_TEMPFAIL of sysexits.h ("try again later"). 0 means the run finished,
# 2 a user error (bad config, data or paths), 130 a second Ctrl-C, anything else a crash.
# launch/slurm/common.sh requeues on this code (LONGACT_EXIT_STOPPED, same value).
STOP_EXIT_CODE = 75

# A signal can arrive twice for one stop (the launcher forwards it and Slurm signals every
# process of the step); a second SIGINT counts as "abort now" only after this many seconds.
REPEAT_WINDOW_S = 2.0

__all__ = ["STOP_EXIT_CODE", "STOP_SIGNALS", "StopRequest", "stopped_step"]

_stopped_step: int | None = None


def stopped_step() -> int | None:
    """The step after which this process's last loop stopped on a signal (None: it did not)."""
    return _stopped_step


class StopRequest:
    """Installs handlers for ``STOP_SIGNALS`` (main thread only) and reports agreed stops."""

    def __init__(self) -> None:
        global _stopped_step
        self.requested = False
        self._first_at = 0.0
        _stopped_step = None
        start_checkpoint_writer_queue()
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        now = time.monotonic()
        if self.requested:
            if signum == signal.SIGINT and now - self._first_at > REPEAT_WINDOW_S:
                raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait
            return
        self._first_at = now
        logger.warning("received %s: will checkpoint and stop after this step",
                       signal.Signals(signum).name)  # fmt: skip
        self.requested = True

    def agreed(self, *, step: int | None = None) -> bool:
        """True on every rank when any rank got a stop signal; ``step`` (the step just done)
        is then recorded for :func:`stopped_step`. All ranks must call it."""
        global _stopped_step
        flag = torch.tensor([1.0 if self.requested else 0.0])
        flag = flag.to(current_device())
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stopping = bool(flag.item())
        if stopping and step is not None:
            _stopped_step = step
        return stopping
