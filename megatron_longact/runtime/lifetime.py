"""Helper processes die with their parent: no orphans after a ``kill -9`` of a trainer.

A trainer starts helpers it does not wait for: megatron's checkpoint-writer results Manager
(spawned, kept for the whole run), the writer processes it forks during a save, and Python's
multiprocessing resource_tracker. The Manager and the tracker ignore SIGTERM (the Manager
because we spawn it with the stop signals ignored, see :func:`start_checkpoint_writer_queue`;
the tracker by design), so after a ``kill -9`` of the trainer they lived on, holding memory.

The fix is Linux's parent-death signal (``prctl(PR_SET_PDEATHSIG)``): the kernel sends the
child SIGKILL when its parent exits. It is set in every forked child (``os.register_at_fork``)
and in the spawned Manager (its initializer). The resource_tracker exits by itself once every
holder of its pipe (trainer, Manager, writers) is gone. Stdlib only: the spawned Manager imports
this module before anything else.

Caveat: Linux sends the signal when the parent *thread* that forked the child exits, so a
helper forked from a short-lived thread would die with that thread. megatron forks its
writers from the thread that saves (the main thread here).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

# linux/prctl.h
PR_SET_PDEATHSIG = 1
# Signals that reach the whole process group on a stop (torchrun's killpg, Slurm's step
# signal, Ctrl-C on a terminal): the stop handler in runtime/signals.py catches them.
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)

_fork_parent_pid: int | None = None
_fork_guard_installed = False
_writer_manager = None  # keeps megatron's results-queue Manager alive for the whole run


def die_with_parent(parent_pid: int | None = None, sig: int = signal.SIGKILL) -> None:
    """Asks the kernel to send ``sig`` to this process when its parent exits (Linux).

    ``parent_pid``: the pid the caller expects as parent; when the parent already died before
    the call (the race between fork and prctl), the process exits at once. No-op elsewhere.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return  # e.g. a seccomp profile forbids prctl: keep running rather than fail
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


def _before_fork() -> None:
    global _fork_parent_pid
    _fork_parent_pid = os.getpid()


def _after_fork_in_child() -> None:
    die_with_parent(_fork_parent_pid)


def install_fork_guard() -> None:
    """Every process forked from now on (megatron's checkpoint writers, data workers) gets
    SIGKILL when this process exits. Idempotent."""
    global _fork_guard_installed
    if _fork_guard_installed:
        return
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
    _fork_guard_installed = True


def start_checkpoint_writer_queue() -> None:
    """Starts megatron's checkpoint-writer results queue now: stop signals ignored, killed
    with this process.

    megatron's torch_dist writer passes results through a queue of a spawn-context
    ``multiprocessing`` Manager that it would start on the first save and keep
    (``dist_checkpointing/strategies/filesystem_async.py`` lines 48-56, megatron-core 0.16.1:
    ``_get_write_results_queue`` returns the module's ``_results_queue`` when set). Stop
    signals reach the whole process group, and a fresh interpreter dies of SIGUSR1 and
    SIGINT, so the save a stop asked for failed with BrokenPipeError: the Manager starts with
    them ignored (ignored signals stay ignored across exec). Because it then ignores SIGTERM
    too, it must die with its parent: its initializer sets the parent-death signal. Also
    installs :func:`install_fork_guard`. Idempotent.
    """
    global _writer_manager
    install_fork_guard()
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_longact.runtime.mcore_compat import replace_global

    if filesystem_async._results_queue is not None:
        return
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        manager = SyncManager(ctx=mp.get_context("spawn"))
        manager.start(initializer=die_with_parent, initargs=(os.getpid(),))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    _writer_manager = manager
    replace_global(filesystem_async, "_results_queue", manager.Queue())
