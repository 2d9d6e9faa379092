"""Checks before step 1: the run's output folders are writable and can hold a checkpoint.

Without them a read-only ``save_dir`` or ``tensorboard_dir`` was found at the first write, and
a full disk at the first save: both after the steps before it were spent.
"""

from __future__ import annotations

import errno
import shutil
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_longact.device import current_device

# Bytes a checkpoint stores per parameter beyond the weights themselves: the fp32 master copy
# (bf16 runs) and Adam's two fp32 moments, which the distributed optimizer saves.
ADAM_MOMENT_BYTES = 8
FP32_MASTER_BYTES = 4
# Headroom over the estimate: metadata, RNG and common state, filesystem block rounding.
ROOM_MARGIN = 1.1


def check_writable(folder: Path, *, field: str) -> None:
    """Creates ``folder`` if needed and writes (then removes) a probe file in it.

    Raises:
        PermissionError: naming ``field`` and the folder when it cannot be written.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"\0")
        probe.unlink()
    except OSError as err:
        raise PermissionError(
            f"{field}={folder} is not writable ({err.strerror or type(err).__name__}); fix its "
            f"permissions or set {field} to a writable folder"
        ) from err


def checkpoint_bytes(model: list, *, with_optimizer: bool) -> int:
    """Estimated size in bytes of one checkpoint of ``model`` (the whole model, all ranks).

    Counts each parameter element once over the TP x PP grid (DP and CP replicas save one
    copy): its own dtype's bytes, plus a fp32 master for 16-bit weights and Adam's two
    moments when the optimizer is saved. All ranks must call it (collective).
    """
    from megatron.core import parallel_state as ps

    total = 0
    if ps.get_data_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0:
        for param in (p for chunk in model for p in chunk.parameters()):  # all VPP chunks
            size = param.element_size()
            if with_optimizer:
                size += ADAM_MOMENT_BYTES + (FP32_MASTER_BYTES if size < 4 else 0)
            total += param.numel() * size
    count = torch.tensor([total], dtype=torch.float64)
    count = count.to(current_device())
    if dist.is_initialized():
        dist.all_reduce(count)
    return int(count.item())


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.2f} GiB"


def check_room(save_dir: Path, *, needed: int) -> None:
    """Raises OSError (ENOSPC) when ``save_dir``'s filesystem has less than ``needed`` bytes
    (times ``ROOM_MARGIN``) free."""
    free = shutil.disk_usage(save_dir).free
    if free < needed * ROOM_MARGIN:
        raise OSError(
            errno.ENOSPC,
            f"checkpoint.save_dir={save_dir}: {_gib(free)} free, one checkpoint needs about "
            f"{_gib(needed * ROOM_MARGIN)} (parameters x bytes per parameter incl. optimizer "
            "state); free space or point checkpoint.save_dir at a larger filesystem",
        )


def preflight(*, save_dir: str | None, other_dirs: dict[str, str | None], model: list,
              with_optimizer: bool) -> None:  # fmt: skip
    """Checks, before step 1, that ``save_dir`` and ``other_dirs`` ({config field: folder},
    e.g. the TensorBoard folder) are writable and that ``save_dir`` has room for one
    checkpoint. Rank 0 checks (the folders are shared); every rank raises the same error.
    All ranks must call it (collective).

    Raises:
        PermissionError: a folder is not writable (names the field).
        OSError: (ENOSPC) not enough free space for one checkpoint.
    """
    needed = checkpoint_bytes(model, with_optimizer=with_optimizer) if save_dir else 0
    error: BaseException | None = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            folders = {"checkpoint.save_dir": save_dir, **other_dirs}
            for field, folder in folders.items():
                if folder:
                    check_writable(Path(folder), field=field)
            if save_dir:
                check_room(Path(save_dir), needed=needed)
        except OSError as err:
            error = err
    if dist.is_initialized():
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise error
