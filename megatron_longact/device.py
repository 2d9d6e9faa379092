"""The one place that answers "CPU or CUDA?" (pure torch; every layer may import it).

A rank runs on CUDA exactly when torch sees a GPU: ``init_distributed`` then picks NCCL and
this rank's ``LOCAL_RANK`` device, and everything else (model placement, RNG states, batches,
synchronisation, CPU-only megatron settings) asks here instead of calling
``torch.cuda.is_available()`` itself.
"""

from __future__ import annotations

import torch


def on_cuda() -> bool:
    """True when this process trains on a GPU (torch sees CUDA), False on a CPU machine."""
    return torch.cuda.is_available()


def current_device() -> torch.device:
    """This rank's device: ``cuda:<current>`` on a GPU machine, else ``cpu``."""
    return torch.device("cuda", torch.cuda.current_device()) if on_cuda() else torch.device("cpu")


def synchronize() -> None:
    """Waits for this rank's queued GPU work (a no-op on CPU): before wall-clock timings and
    before handing memory to another allocator."""
    if on_cuda():
        torch.cuda.synchronize()
