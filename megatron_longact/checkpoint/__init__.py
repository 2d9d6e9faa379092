"""Sharded, atomically saved, checksummed megatron checkpoints."""

from megatron_longact.checkpoint.dist_ckpt import (
    LoadedCheckpoint,
    latest_checkpoint,
    load_checkpoint,
    resume_or_load,
    save_checkpoint,
    save_if_due,
    verified_checkpoint,
)
from megatron_longact.checkpoint.integrity import CheckpointCorruptError, verify_checkpoint
from megatron_longact.checkpoint.preflight import preflight

__all__ = [
    "CheckpointCorruptError",
    "LoadedCheckpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "preflight",
    "resume_or_load",
    "save_checkpoint",
    "save_if_due",
    "verified_checkpoint",
    "verify_checkpoint",
]
