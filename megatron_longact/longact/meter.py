"""Forward hooks that measure Eq. 2 during the ordinary forward of a megatron GPTModel.

A hook on each ``self_attention.linear_qkv`` of this pipeline stage sees the fused QKV output
(before QK-norm and RoPE) and feeds a :class:`SaliencyAccumulator`. The data iterator is
wrapped by :meth:`SaliencyMeter.observe`, which reads each micro-batch's ``token_mask`` /
``cu_seqlens`` when the schedule calls ``next()`` (right before that micro-batch's forward, on
every stage, in order) and arms the hooks; nothing is measured outside an observed iterator
(evaluation passes, log-prob passes). The iterator yields whole micro-batches; the forward
step then cuts them for context parallel (and flattens THD), so ``observe`` describes each one
through the same cut (:func:`local_layout`, i.e. ``runtime.forward.local_rows``).

Full activation recompute runs each layer's forward twice: once for real (under no_grad) and
once inside backward. ``torch._C._current_graph_task_id()`` is -1 outside backward and a task
id during the recompute, so the hook skips the second run and every micro-batch counts once.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import torch

from megatron_longact.errors import UserError
from megatron_longact.longact.saliency import SaliencyAccumulator, describe_micro_batch
from megatron_longact.models.gpt import unwrap_gpt
from megatron_longact.models.qkv_layout import QKVLayout


def local_layout(fields: dict[str, torch.Tensor], *, thd: bool) -> dict[str, torch.Tensor]:
    """[b, S] ``fields`` of a whole micro-batch cut as the forward steps cut it on this rank
    (CP chunks; [1, b * S / CP] for THD). ``thd`` is :func:`runtime.forward.uses_thd` of the
    full batch (the fields alone lack its ``attention_mask``). No collectives."""
    from megatron_longact.runtime.forward import local_rows

    return local_rows(fields, thd=thd)[0]


def find_qkv_modules(model_chunks: list[torch.nn.Module]) -> dict[int, torch.nn.Module]:
    """``{global layer index (0-based): linear_qkv}`` for the layers of this pipeline stage."""
    found = {}
    for chunk in model_chunks:
        decoder = getattr(unwrap_gpt(chunk), "decoder", None)
        for layer in getattr(decoder, "layers", []):
            attention = getattr(layer, "self_attention", None)
            qkv = getattr(attention, "linear_qkv", None)
            if qkv is not None:
                found[layer.layer_number - 1] = qkv  # megatron numbers layers from 1, globally
    if not found:
        raise ValueError("no self_attention.linear_qkv found: LongAct needs a megatron GPTModel")
    return found


def _in_backward_recompute() -> bool:
    return torch._C._current_graph_task_id() != -1


class SaliencyMeter:
    """Measures M for every layer of this stage while the model trains or runs forward-only.

    Construct on every rank after the model is built; it registers one forward hook per
    ``linear_qkv`` (removed by :meth:`close`). Per step: ``observe`` the data iterator, run the
    schedule, then :meth:`reduce` (collective over DP and TP).
    """

    def __init__(self, model_chunks: list[torch.nn.Module], *, layout: QKVLayout) -> None:
        from megatron.core import parallel_state

        if len(model_chunks) > 1:
            # observe() arms the hooks per next() of one iterator, but the interleaved schedule
            # replays each micro-batch to every chunk later (runtime.train_step.chunk_iterators),
            # when the meter has moved on: the rows would be credited to the wrong samples.
            raise UserError(
                "LongAct saliency does not support virtual pipeline stages yet; set "
                "parallel.virtual_pipeline_model_parallel_size null"
            )
        self.layout = layout
        self.modules = find_qkv_modules(model_chunks)
        weight = next(iter(self.modules.values())).weight
        if weight.shape[0] != layout.rows_per_rank:
            raise ValueError(
                f"linear_qkv.weight has {weight.shape[0]} rows, the layout says "
                f"{layout.rows_per_rank} per TP rank; the transformer config does not match"
            )
        self.device = weight.device
        cp_size = parallel_state.get_context_parallel_world_size()
        self.cp_size = cp_size
        self.dp_group = parallel_state.get_data_parallel_group(with_context_parallel=False)
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.accumulator = SaliencyAccumulator(
            list(self.modules),
            num_local_rows=layout.rows_per_rank,
            device=weight.device,
            cp_group=parallel_state.get_context_parallel_group() if cp_size > 1 else None,
        )
        self._handles = [
            module.register_forward_hook(self._make_hook(number))
            for number, module in self.modules.items()
        ]

    @property
    def layer_numbers(self) -> list[int]:
        """Global 0-based indices of the layers this stage measures."""
        return self.accumulator.layer_numbers

    def _make_hook(self, layer_number: int):
        @torch.no_grad()
        def hook(_module, _args, output):
            if self.accumulator.samples is None or _in_backward_recompute():
                return
            out, bias = output if isinstance(output, tuple) else (output, None)
            if bias is not None:  # skip_bias_add: Q = x W^T + b is what attention sees
                out = out + bias
            self.accumulator.add(layer_number, out)

        return hook

    def observe(self, data_iterator: Iterator) -> Iterator:
        """Wraps ``data_iterator``: each ``next()`` arms the hooks for that micro-batch.

        Yields the batches unchanged. Call once per step, on every rank, with the iterator the
        schedule will read.
        """
        from megatron_longact.runtime.forward import uses_thd

        for batch in data_iterator:
            samples = describe_micro_batch(
                batch, localize=partial(local_layout, thd=uses_thd(batch)), device=self.device
            )
            self.accumulator.begin_micro_batch(samples)
            yield batch

    def reduce(self) -> tuple[dict[int, torch.Tensor], int]:
        """M rows of every layer of this stage over the global batch, and the sample count.

        Disarms the hooks and resets. All ranks of the stage must call it (DP all-reduce, TP
        all-gather). Returns ``({layer: [(N + 2G) * D] float32}, num_samples)``.
        """
        return self.accumulator.reduce(dp_group=self.dp_group, tp_group=self.tp_group)

    def split(self, rows: dict[int, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
        """``{layer: rows}`` -> ``{layer: {"q": [N, D], "k": [G, D], "v": [G, D]}}``."""
        return {n: self.layout.per_head(r.cpu()) for n, r in rows.items()}

    def close(self) -> None:
        """Removes the hooks (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.accumulator.reset()
