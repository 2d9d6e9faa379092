"""Sharded, atomically saved megatron checkpoints."""

from megatron_longact.checkpoint.dist_ckpt import (
    LoadedCheckpoint,
    latest_checkpoint,
    load_checkpoint,
    resume_or_load,
    save_checkpoint,
    save_if_due,
)

__all__ = [
    "LoadedCheckpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "resume_or_load",
    "save_checkpoint",
    "save_if_due",
]
