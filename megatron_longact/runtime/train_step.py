"""One optimizer step through megatron's pipeline schedule, and the loss plumbing it needs.

Loss contract (``calculate_per_token_loss``): a forward step's loss function returns
``(loss_sum, normaliser, {"loss": [loss_sum, normaliser]})``. megatron backpropagates
``loss_sum`` unscaled, all-reduces the normalisers over DP x CP in ``finalize_model_grads`` and
divides the gradients by that total. The effective loss is therefore sum / global count,
however the global batch is split into micro-batches and DP/CP ranks.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_longact.device import current_device
from megatron_longact.models.moe import moe_step_metrics
from megatron_longact.runtime.batches import check_virtual_pipeline_microbatches
from megatron_longact.runtime.setup import TrainState


@dataclass(frozen=True, kw_only=True)
class StepResult:
    """Metrics of one optimizer step, identical on every rank."""

    loss: float
    """Global-batch loss: sum over DP/CP/micro-batches divided by the global normaliser."""
    num_tokens: int
    """Global normaliser (valid tokens for token-mean losses)."""
    grad_norm: float
    lr: float
    update_successful: bool
    extras: dict[str, float]
    """Other reported metrics (``report_keys``), reduced like the loss."""


def masked_sum_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Loss function for ``forward_step``: per-token losses [b, s] -> (sum, count, report).

    ``loss_mask`` [b, s] float (1 = token counts). Returns the masked sum (scalar, the thing
    backpropagated), the token count (int tensor) and ``{"loss": tensor([sum, count])}``.
    """
    losses = output_tensor.float()
    mask = loss_mask.to(losses.dtype)
    loss_sum = (losses * mask).sum()
    count = mask.sum().to(torch.int)
    return loss_sum, count, {"loss": torch.stack([loss_sum.detach(), count.to(losses.dtype)])}


def reduce_reports(reports: list[dict], *, key: str = "loss") -> tuple[float, int]:
    """Sums ``[sum, count]`` reports over micro-batches, DP x CP ranks and pipeline stages.

    Only the last pipeline stage holds reports; the result is broadcast so that every rank
    returns the same (global sum / global count, global count). All ranks must call it.
    """
    from megatron.core import parallel_state

    total = torch.zeros(2, dtype=torch.float64)
    for report in reports:
        if key in report:
            total += report[key].detach().double().cpu()
    total = total.to(current_device())
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(
            total,
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
    count = int(total[1].item())
    return (total[0] / max(count, 1)).item(), count


def chunk_iterators(data_iterator: Iterator, *, num_chunks: int, num_microbatches: int):
    """What megatron's schedule takes as ``data_iterator`` for ``num_chunks`` model chunks:
    the iterator itself for one chunk; for virtual pipeline stages one iterator per chunk,
    each yielding the same micro-batches (the interleaved schedule calls chunk ``v``'s forward
    step with ``data_iterator[v]``, ``pipeline_parallel/schedules.py`` ~1231, 0.16.1).
    ``itertools.tee`` draws each micro-batch from ``data_iterator`` once, so a generator
    with side effects runs once per micro-batch as under the plain schedule. No collectives.
    """
    if num_chunks == 1:
        return data_iterator
    from megatron.core import parallel_state

    check_virtual_pipeline_microbatches(
        num_microbatches, pp=parallel_state.get_pipeline_model_parallel_world_size(),
        vpp=num_chunks,
    )  # fmt: skip
    return list(itertools.tee(data_iterator, num_chunks))


def train_step(
    state: TrainState,
    *,
    forward_step_func: Callable,
    data_iterator: Iterator,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    report_keys: tuple[str, ...] = (),
) -> StepResult:
    """Zero grads, forward/backward over ``num_microbatches``, optimizer and scheduler step.

    ``data_iterator`` yields one micro-batch per ``next`` on every rank (every pipeline stage
    reads the same batches; stages ignore what they do not need; with virtual pipeline stages
    every chunk reads them, see :func:`chunk_iterators`). ``report_keys`` names extra
    ``[sum, weight]`` entries of the loss reports to reduce into ``extras`` (the same on every
    rank: it drives collectives). All ranks must call it.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in state.model:
        chunk.zero_grad_buffer()
    state.optimizer.zero_grad()
    forward_backward = get_forward_backward_func()
    reports = forward_backward(
        forward_step_func=forward_step_func,
        data_iterator=chunk_iterators(
            data_iterator, num_chunks=len(state.model), num_microbatches=num_microbatches
        ),  # fmt: skip
        model=state.model,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    update_successful, grad_norm, _ = state.optimizer.step()
    if update_successful:
        state.scheduler.step(increment=1)
    loss, count = reduce_reports(reports)
    extras = {key: reduce_reports(reports, key=key)[0] for key in report_keys}
    # MoE: the router's load-balancing loss of this step (empty for dense models).
    extras.update(moe_step_metrics(state.transformer_config, num_microbatches=num_microbatches))
    return StepResult(
        loss=loss,
        num_tokens=count,
        grad_norm=float(grad_norm) if grad_norm is not None else 0.0,
        lr=state.optimizer.param_groups[0]["lr"],
        update_successful=bool(update_successful),
        extras=extras,
    )


@torch.no_grad()
def forward_only(
    model: list,
    *,
    forward_step_func: Callable,
    data_iterator: Iterator,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
) -> list[dict]:
    """Runs ``num_microbatches`` forward in eval mode through megatron's schedule; returns the
    loss functions' reports (on the last pipeline stage; empty elsewhere). All ranks call it."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in model:
        chunk.eval()
    try:
        return get_forward_backward_func()(
            forward_step_func=forward_step_func,
            data_iterator=chunk_iterators(
                data_iterator, num_chunks=len(model), num_microbatches=num_microbatches
            ),  # fmt: skip
            model=model,
            num_microbatches=num_microbatches,
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=True,
        )
    finally:
        for chunk in model:
            chunk.train()


def eval_step(state: TrainState, **kwargs) -> tuple[float, int]:
    """Validation loss: :func:`forward_only` over ``state.model`` reduced to (global mean
    loss, token count). Takes :func:`forward_only`'s keyword arguments."""
    return reduce_reports(forward_only(state.model, **kwargs))
