"""Offline saliency profiling: forward-only passes over given batches -> M for every layer.

Feeds ``schedule=static`` and the heatmaps of ``tools/plot_saliency.py``.

File format (safetensors, float32, one file for all pipeline stages)::

    layers.<L>.q   [N, D]   M^Q of layer L (0-based, global numbering)
    layers.<L>.k   [G, D]   M^K
    layers.<L>.v   [G, D]   M^V
    metadata: format="longact-saliency", version="1", num_samples, num_heads, num_groups,
              head_dim, num_layers (all as strings, as safetensors requires)

M[h, d] = mean over samples of sqrt(sum over the sample's real tokens of X[s, h, d]^2), X the
``linear_qkv`` output before QK-norm and RoPE (paper Eq. 2).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_longact.errors import UserError
from megatron_longact.longact.meter import SaliencyMeter
from megatron_longact.models.qkv_layout import QKVLayout

FILE_FORMAT = "longact-saliency"
FILE_VERSION = "1"


@dataclass(frozen=True, kw_only=True)
class SaliencyProfile:
    """M for all layers, as measured or read from a file."""

    saliency: dict[int, dict[str, torch.Tensor]]
    """``{layer: {"q": [N, D], "k": [G, D], "v": [G, D]}}`` float32 on CPU."""
    num_samples: int
    num_heads: int
    num_groups: int
    head_dim: int


def measure_saliency(
    state,
    batches: Sequence[dict[str, torch.Tensor]],
    *,
    micro_batch_size: int,
    seq_length: int,
    forward_step_func: Callable | None = None,
) -> SaliencyProfile:
    """Runs ``batches`` forward-only through ``state.model`` and returns M of every layer.

    Args:
        state: a :class:`runtime.setup.TrainState` (model chunks + transformer config).
        batches: this rank's micro-batches (same dicts as for training; ``token_mask`` and
            ``cu_seqlens`` are honoured). DP ranks pass their own shards; M is the mean over
            all of them.
        micro_batch_size, seq_length: as for megatron's schedules.
        forward_step_func: defaults to :func:`runtime.forward.lm_forward_step`.

    Returns the same profile on every rank (all pipeline stages merged). All ranks must call
    it (megatron schedule, DP/TP/PP collectives).
    """
    from megatron.core import parallel_state

    from megatron_longact.runtime.forward import lm_forward_step
    from megatron_longact.runtime.train_step import eval_step

    if not batches:
        raise ValueError("saliency profiling needs at least one batch")
    layout = QKVLayout.from_transformer_config(state.transformer_config)
    meter = SaliencyMeter(state.model, layout=layout)
    try:
        eval_step(
            state,
            forward_step_func=forward_step_func or lm_forward_step,
            data_iterator=meter.observe(iter(batches)),
            num_microbatches=len(batches),
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
        )
        rows, num_samples = meter.reduce()
    finally:
        meter.close()
    saliency = meter.split(rows)
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    if dist.get_world_size(pp_group) > 1:
        gathered: list[dict] = [{} for _ in range(dist.get_world_size(pp_group))]
        dist.all_gather_object(gathered, saliency, group=pp_group)
        saliency = {n: per for part in gathered for n, per in part.items()}
    return SaliencyProfile(
        saliency=dict(sorted(saliency.items())),
        num_samples=num_samples,
        num_heads=layout.num_heads,
        num_groups=layout.num_groups,
        head_dim=layout.head_dim,
    )


def save_saliency(path: str | Path, profile: SaliencyProfile) -> None:
    """Writes ``profile`` as safetensors (format in the module docstring). Local I/O."""
    from safetensors.torch import save_file

    tensors = {
        f"layers.{n}.{p}": values.float().contiguous().cpu()
        for n, per in profile.saliency.items()
        for p, values in per.items()
    }
    metadata = {
        "format": FILE_FORMAT,
        "version": FILE_VERSION,
        "num_samples": str(profile.num_samples),
        "num_heads": str(profile.num_heads),
        "num_groups": str(profile.num_groups),
        "head_dim": str(profile.head_dim),
        "num_layers": str(len(profile.saliency)),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)


def load_saliency(path: str | Path) -> SaliencyProfile:
    """Reads a file written by :func:`save_saliency`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"saliency file {path} not found; write one with `longact saliency` "
            "(longact.profile.profile_saliency)"
        )
    saliency: dict[int, dict[str, torch.Tensor]] = {}
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != FILE_FORMAT:
            raise UserError(
                f"{path} is not a LongAct saliency file (format={metadata.get('format')!r})"
            )
        for key in handle.keys():
            _, layer, projection = key.split(".")
            saliency.setdefault(int(layer), {})[projection] = handle.get_tensor(key)
    return SaliencyProfile(
        saliency=dict(sorted(saliency.items())),
        num_samples=int(metadata["num_samples"]),
        num_heads=int(metadata["num_heads"]),
        num_groups=int(metadata["num_groups"]),
        head_dim=int(metadata["head_dim"]),
    )


def profile_saliency(
    state,
    batches: Sequence[dict[str, torch.Tensor]],
    *,
    path: str | Path | None,
    micro_batch_size: int,
    seq_length: int,
    forward_step_func: Callable | None = None,
) -> SaliencyProfile:
    """:func:`measure_saliency`, then global rank 0 writes ``path`` (when given). All ranks."""
    profile = measure_saliency(
        state,
        batches,
        micro_batch_size=micro_batch_size,
        seq_length=seq_length,
        forward_step_func=forward_step_func,
    )
    if path is not None:
        if not dist.is_initialized() or dist.get_rank() == 0:
            save_saliency(path, profile)
        if dist.is_initialized():
            dist.barrier()
    return profile
