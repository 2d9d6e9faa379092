"""``mode=freeze``: masked rows do not move at all in a step.

A zero gradient is not a freeze: AdamW's decoupled weight decay and the momentum left from
earlier steps still move a row whose gradient is zero. This module snapshots the masked rows
of the fp32 main parameters the inner torch optimizer updates, and of its per-element states
(``exp_avg``, ``exp_avg_sq``, ...), in a step pre-hook, and writes them back in a step
post-hook. The post-hook runs inside ``inner_optimizer.step()``, so before megatron copies main
params to the model params and before the distributed optimizer's param all-gather: every rank
then sees the restored rows.

Where a masked row lives, per megatron optimizer:

* ``DistributedOptimizer``: each DP rank steps a flat 1/dp shard of each grad bucket,
  ignoring row boundaries: a parameter's owned flat range ``[start, end)`` comes from
  ``_get_model_param_range_map(param)["param"]``; main shards are
  ``shard_fp32_from_float16_groups`` (bf16/fp16 params) or ``shard_fp32_groups`` (fp32 params,
  views of the params themselves).
* ``Float16OptimizerWithFloat16Params``: full fp32 copies (``fp32_from_float16_groups``).
* ``FP32Optimizer``: the model params themselves.
* ``ChainedOptimizer``: each of its ``chained_optimizers``.

A flat range covers at most a partial first row, whole rows and a partial last row; each piece
is viewed as a [rows, width] block and masked rows are gathered / scattered with
``index_select`` / ``index_copy_``, so no element-sized mask is ever built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from megatron_longact.errors import UserError


@dataclass(kw_only=True)
class _Shard:
    """The part of one model parameter that one inner optimizer steps."""

    main: torch.Tensor
    """The tensor in ``inner.param_groups`` (fp32); viewed flat, ``end - start`` elements."""
    model_param: torch.nn.Parameter
    start: int
    end: int
    row_width: int
    """Elements per row of ``model_param`` (hidden size for a weight, 1 for a bias)."""
    saved: list = field(default_factory=list)


def _row_pieces(start: int, end: int, width: int) -> list[tuple[int, int, int, int]]:
    """Split flat range [start, end) of a [rows, width] tensor into row-aligned blocks.

    Returns ``(first_row, num_rows, offset_in_range, cols)`` per block; at most 3 blocks.
    """
    pieces, pos = [], start
    while pos < end:
        row, col = divmod(pos, width)
        if col or end - pos < width:
            cols = min(width - col, end - pos)
            pieces.append((row, 1, pos - start, cols))
            pos += cols
        else:
            rows = (end - pos) // width
            pieces.append((row, rows, pos - start, width))
            pos += rows * width
    return pieces


def _shards_of(optimizer, params: set) -> list[tuple[torch.optim.Optimizer, _Shard]]:
    """Every (inner torch optimizer, shard) pair of ``optimizer`` for the given params."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import (
        ChainedOptimizer,
        Float16OptimizerWithFloat16Params,
        FP32Optimizer,
    )

    def shard(main, param, start, end):
        return _Shard(
            main=main,
            model_param=param,
            start=start,
            end=end,
            row_width=param.numel() // param.shape[0],
        )

    if isinstance(optimizer, ChainedOptimizer):
        return [pair for sub in optimizer.chained_optimizers for pair in _shards_of(sub, params)]
    if getattr(optimizer, "is_stub_optimizer", False) or optimizer.optimizer is None:
        return []
    inner = optimizer.optimizer
    if getattr(optimizer.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False):
        raise UserError(
            "longact.mode=freeze does not support use_precision_aware_optimizer (main params "
            "live inside the fused optimizer); use longact.mode=grad"
        )
    pairs = []
    if isinstance(optimizer, DistributedOptimizer):
        groups = [
            *zip(optimizer.model_float16_groups, optimizer.shard_fp32_from_float16_groups),
            *zip(optimizer.model_fp32_groups, optimizer.shard_fp32_groups),
        ]
        for model_group, main_group in groups:
            for param, main in zip(model_group, main_group):
                if param in params:
                    rng = optimizer._get_model_param_range_map(param)["param"]
                    pairs.append((inner, shard(main, param, rng.start, rng.end)))
    elif isinstance(optimizer, Float16OptimizerWithFloat16Params):
        groups = [
            *zip(optimizer.float16_groups, optimizer.fp32_from_float16_groups),
            *zip(optimizer.fp32_from_fp32_groups, optimizer.fp32_from_fp32_groups),
        ]
        for model_group, main_group in groups:
            for param, main in zip(model_group, main_group):
                if param in params:
                    pairs.append((inner, shard(main, param, 0, param.numel())))
    elif isinstance(optimizer, FP32Optimizer):
        for group in inner.param_groups:
            for param in group["params"]:
                if param in params:
                    pairs.append((inner, shard(param, param, 0, param.numel())))
    else:
        raise UserError(
            f"longact.mode=freeze does not know megatron optimizer {type(optimizer).__name__}; "
            "use longact.mode=grad"
        )
    return pairs


class OptimizerFreezer:
    """Keeps masked rows (and their Adam states) bit-identical through ``optimizer.step()``.

    Args:
        optimizer: the megatron optimizer (chained, distributed, float16 or fp32).
        frozen_rows: ``frozen_rows(param)`` -> bool [rows of param] (True = keep still) or None
            (nothing frozen); asked in every step's pre-hook, so it can change per step.
        params: the model parameters that may be frozen (qkv weights and biases).

    Construct on every rank; no collectives (each rank restores the shard it steps).
    """

    STATE_KEYS_SKIPPED = ("step",)

    def __init__(
        self,
        optimizer,
        *,
        frozen_rows: Callable[[torch.nn.Parameter], torch.Tensor | None],
        params: list[torch.nn.Parameter],
    ) -> None:
        self.frozen_rows = frozen_rows
        by_inner: dict[int, tuple[torch.optim.Optimizer, list[_Shard]]] = {}
        for inner, piece in _shards_of(optimizer, set(params)):
            by_inner.setdefault(id(inner), (inner, []))[1].append(piece)
        self._handles = []
        for inner, shards in by_inner.values():
            self._handles.append(inner.register_step_pre_hook(self._pre_hook(shards)))
            self._handles.append(inner.register_step_post_hook(self._post_hook(inner, shards)))

    def _pieces(self, shard: _Shard):
        """(block view maker, frozen row indices) per row-aligned block of the shard."""
        frozen = self.frozen_rows(shard.model_param)
        if frozen is None:
            return []
        frozen = frozen.to(device=shard.main.device, dtype=torch.bool)
        out = []
        for row, rows, offset, cols in _row_pieces(shard.start, shard.end, shard.row_width):
            index = frozen[row : row + rows].nonzero().squeeze(1)
            if index.numel():
                out.append((offset, rows, cols, index))
        return out

    @staticmethod
    def _block(tensor: torch.Tensor, offset: int, rows: int, cols: int) -> torch.Tensor:
        return tensor.view(-1)[offset : offset + rows * cols].view(rows, cols)

    def _pre_hook(self, shards: list[_Shard]):
        @torch.no_grad()
        def hook(inner, _args, _kwargs):
            for shard in shards:
                shard.saved = []
                for offset, rows, cols, index in self._pieces(shard):
                    tensors = {"param": shard.main}
                    for key, value in inner.state.get(shard.main, {}).items():
                        if (
                            key not in self.STATE_KEYS_SKIPPED
                            and torch.is_tensor(value)
                            and value.numel() == shard.main.numel()
                        ):
                            tensors[key] = value
                    saved = {
                        key: self._block(t, offset, rows, cols).index_select(0, index)
                        for key, t in tensors.items()
                    }
                    shard.saved.append((offset, rows, cols, index, saved))

        return hook

    def _post_hook(self, inner, shards: list[_Shard]):
        @torch.no_grad()
        def hook(_inner, _args, _kwargs):
            for shard in shards:
                state = inner.state.get(shard.main, {})
                for offset, rows, cols, index, saved in shard.saved:
                    self._block(shard.main, offset, rows, cols).index_copy_(
                        0, index, saved["param"]
                    )
                    for key, value in state.items():
                        if (
                            key in self.STATE_KEYS_SKIPPED
                            or not torch.is_tensor(value)
                            or value.numel() != shard.main.numel()
                        ):
                            continue
                        block = self._block(value, offset, rows, cols)
                        if key in saved:
                            block.index_copy_(0, index, saved[key])
                        else:  # state created by this step: as if the row never trained
                            block.index_fill_(0, index, 0.0)
                shard.saved = []

        return hook

    def close(self) -> None:
        """Removes the optimizer hooks (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
