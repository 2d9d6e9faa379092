"""Refit: the trainer's weights as Hugging Face-layout tensors, and what changed since last time.

:func:`iter_hf_tensors_from_model` produces Hugging Face-layout tensors from the live megatron
chunk (TP all-gather, QKV / gate-up split through ``convert``'s mapping, PP broadcast), and
:class:`ChangeTracker` drops tensors whose fingerprint did not change since the last refit. The
colocated vLLM engine (:mod:`rl.rollout.vllm_engine`) loads what is left. Pure torch + megatron,
tested on CPU (tests/rl/test_vllm_engine.py).

Row deltas: LongAct updates only the selected rows of W_Q / W_K (and with ``longact.mode=
freeze`` the others stay bit-identical), so :meth:`ChangeTracker.diff` reports changed rows and
:func:`row_delta` / :func:`apply_row_delta` express an update as (rows, values). vLLM receives
whole tensors: ``load_weights`` takes full HF tensors, and writing rows directly would need
vLLM's fused per-rank ``qkv_proj`` row layout (q, k, v shards of every TP rank, KV heads
replicated when TP > KV heads), an internal of each vLLM version. In the paper's setting the
saving would be small anyway: W_V, W_O and the MLP train densely and AdamW's weight decay and
momentum move most rows every step; the refit metrics report the changed-row fraction.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_longact.models.hf_config import HFArchitecture
from megatron_longact.models.hf_weights.mapping import (
    HF_EMBEDDING,
    HF_FINAL_NORM,
    HF_LM_HEAD,
    MCORE_EMBEDDING,
    MCORE_FINAL_NORM,
    MCORE_OUTPUT,
    expected_hf_shapes,
    expert_param,
    expert_param_name,
    hf_layer_name,
    hf_layer_shapes,
    layer_to_hf,
)

FINGERPRINT_MODULUS = 1021
"""Column weights of the fingerprint are 1 + (column mod this prime)."""
FINGERPRINT_CHUNK = 1 << 24
"""Elements fingerprinted at once (bounds the int64 temporary to 128 MiB)."""
_QK_SUFFIXES = ("self_attn.q_proj.weight", "self_attn.k_proj.weight")


# ---- Hugging Face-layout tensors from a live megatron chunk ------------------------------


def _full_tensor(param: torch.Tensor, *, gated: bool, expert: bool = False) -> torch.Tensor:
    """``param`` all-gathered over TP along its ``partition_dim``, in its own dtype and device
    (``runtime.params.gather_tensor_parallel`` makes CPU fp32 copies, too slow for a refit).
    A gated ``linear_fc1`` comes back as the unsharded [gate; up]. ``expert``: a routed
    expert's weight, split over expert-TP (ETP, which may differ from TP). All ranks of the
    (expert-)TP group must call it."""
    from megatron.core import parallel_state

    data = param.detach()
    if expert:
        tp = parallel_state.get_expert_tensor_parallel_world_size()
        group = parallel_state.get_expert_tensor_parallel_group() if tp > 1 else None
    else:
        tp = parallel_state.get_tensor_model_parallel_world_size()
        group = parallel_state.get_tensor_model_parallel_group()
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return data
    shards = [torch.empty_like(data) for _ in range(tp)]
    dist.all_gather(shards, data.contiguous(), group=group)
    if gated:  # each shard is [gate_shard; up_shard]
        halves = [shard.chunk(2, dim=0) for shard in shards]
        shards = [h[0] for h in halves] + [h[1] for h in halves]
    return torch.cat(shards, dim=param.partition_dim)


def _stage_manifest(gpt, arch: HFArchitecture) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) of every tensor this pipeline stage yields, in yield order."""
    names = [HF_EMBEDDING] if gpt.pre_process else []
    for layer_module in gpt.decoder.layers:
        layer = layer_module.layer_number - 1  # megatron numbers from 1, globally over PP
        names += [hf_layer_name(layer, suffix) for suffix in hf_layer_shapes(arch)]
    if gpt.post_process:
        names += [HF_FINAL_NORM] + ([] if arch.tie_word_embeddings else [HF_LM_HEAD])
    shapes = expected_hf_shapes(arch)
    shapes[HF_LM_HEAD] = shapes[HF_EMBEDDING]
    return [(name, shapes[name]) for name in names]


def _stage_tensors(gpt, arch: HFArchitecture) -> Iterator[tuple[str, torch.Tensor]]:
    """This stage's tensors in HF layout (TP gathered), in :func:`_stage_manifest` order."""
    params = dict(gpt.named_parameters())
    gated = bool(gpt.config.gated_linear_unit)
    vocab = arch.vocab_size
    if gpt.pre_process:
        yield HF_EMBEDDING, _full_tensor(params[MCORE_EMBEDDING], gated=False)[:vocab]
    for layer_module in gpt.decoder.layers:
        tensors = {
            suffix: _full_tensor(param, gated=gated and suffix == "mlp.linear_fc1.weight")
            for suffix, param in layer_module.named_parameters()
            if expert_param(suffix) is None
        }
        tensors.update(_all_experts(layer_module, gated=gated))  # last: one vLLM module
        yield from layer_to_hf(tensors, layer=layer_module.layer_number - 1, arch=arch).items()
    if gpt.post_process:
        yield HF_FINAL_NORM, _full_tensor(params[MCORE_FINAL_NORM], gated=False)
        if not arch.tie_word_embeddings:
            yield HF_LM_HEAD, _full_tensor(params[MCORE_OUTPUT], gated=False)[:vocab]


def _all_experts(layer_module, *, gated: bool) -> dict[str, torch.Tensor]:
    """Every routed expert of an MoE layer, full (expert-TP gathered), gathered over the
    expert-parallel group: ``{expert_param_name(global index, linear_fc1/2): tensor}``; empty
    for a dense layer. EP rank r holds experts r * E_local .. (r + 1) * E_local - 1 (megatron
    ``MoELayer.local_expert_indices``, ``transformer/moe/moe_layer.py`` ~103-110), so the
    all-gather in EP rank order is the global order. vLLM runs at TP only (no EP) and its
    ``FusedMoE`` loads each expert by its global index from ``mlp.experts.{e}.{gate,up,
    down}_proj.weight`` (``model_executor/layers/fused_moe/routed_experts.py:981-1005``, the
    expert-id mapping ``fused_moe/layer.py:443-462``, called from ``models/qwen3_moe.py``
    ``Qwen3MoeModel.load_weights``, whose stacked mapping leaves experts to it: ~436-447), so
    every rank needs all experts. Collective over the expert-TP and EP groups."""
    from megatron.core import parallel_state

    local: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for suffix, param in layer_module.named_parameters():
        if (found := expert_param(suffix)) is None:
            continue
        index, which = found
        full = _full_tensor(param, gated=gated and which == "linear_fc1", expert=True)
        local.setdefault(which, []).append((index, full))
    if not local:
        return {}
    ep = parallel_state.get_expert_model_parallel_world_size()
    gathered: dict[str, torch.Tensor] = {}
    for which, experts in local.items():
        stacked = torch.stack([t for _, t in sorted(experts, key=lambda e: e[0])])
        if ep > 1:
            parts = [torch.empty_like(stacked) for _ in range(ep)]
            group = parallel_state.get_expert_model_parallel_group()
            dist.all_gather(parts, stacked.contiguous(), group=group)
            stacked = torch.cat(parts)
        gathered[which] = stacked
    # Expert by expert (gate, up, down of expert 0, then 1, ...), the order of
    # mapping.hf_layer_shapes that the PP manifest follows; all go to one vLLM module.
    return {
        expert_param_name(e, which): gathered[which][e]
        for e in range(len(next(iter(gathered.values()))))
        for which in sorted(gathered)
    }


@contextlib.contextmanager
def _synced_params(model: list) -> Iterator[None]:
    """With ``overlap_param_gather`` the distributed optimizer's param all-gather runs in the
    next forward's pre-hooks; sync it now (megatron's own pattern around eval and saving)."""
    hooked = [chunk for chunk in model if getattr(chunk, "use_forward_hook", False)]
    for chunk in hooked:
        chunk.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for chunk in hooked:
            chunk.enable_forward_pre_hook()


def iter_hf_tensors_from_model(
    model: list, *, arch: HFArchitecture
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields ``(HF name, full tensor)`` for the whole model, on every rank.

    ``model``: this rank's [DDP-wrapped GPTModel chunk]; ``arch``: its architecture (the
    unpadded vocabulary). Names and splits are those of ``longact convert --direction mcore2hf``
    (embedding, layers 0..L-1, final norm, ``lm_head`` when untied). Tensors keep the parameter
    dtype and device; tensors of this rank's stage may be views of live parameters, valid until
    the next optimizer step (copy to keep). Collective: all ranks must iterate it to the end
    together (TP all-gathers; with PP each stage broadcasts its tensors to the others).
    """
    from megatron.core import parallel_state

    from megatron_longact.runtime.setup import unwrap_gpt

    if len(model) != 1:
        raise ValueError("virtual pipeline stages (several model chunks) are not supported")
    gpt = unwrap_gpt(model[0])
    with _synced_params(model):
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        if pp == 1:
            yield from _stage_tensors(gpt, arch)
            return
        group = parallel_state.get_pipeline_model_parallel_group()
        my_stage = parallel_state.get_pipeline_model_parallel_rank()
        dtype = next(gpt.parameters()).dtype
        device = next(gpt.parameters()).device
        for stage, src in enumerate(dist.get_process_group_ranks(group)):
            box = [(_stage_manifest(gpt, arch), str(dtype)) if stage == my_stage else None]
            dist.broadcast_object_list(box, src=src, group=group, device=device)
            manifest, dtype_name = box[0]
            if stage == my_stage:
                for (name, tensor), (expected, _) in zip(_stage_tensors(gpt, arch), manifest):
                    assert name == expected, (name, expected)
                    tensor = tensor.contiguous()
                    dist.broadcast(tensor, src=src, group=group)
                    yield name, tensor
                continue
            for name, shape in manifest:
                buffer = torch.empty(
                    shape, dtype=getattr(torch, dtype_name.split(".")[-1]), device=device
                )
                dist.broadcast(buffer, src=src, group=group)
                yield name, buffer


# ---- change detection ---------------------------------------------------------------------


def row_fingerprints(tensor: torch.Tensor) -> torch.Tensor:
    """Per-row fingerprint of ``tensor``'s bits: int64 [R, 2] on CPU.

    Rows are ``tensor``'s first dimension (a 1-D tensor is R rows of one element). Each row's
    bytes are read as int16 words x_j (any float dtype), and the fingerprint is
    (sum_j x_j, sum_j x_j * w_j) with w_j = 1 + (j mod 1021), exact integer arithmetic (no
    overflow: |x| < 2^15, w < 2^10, < 2^38 words per row). A single changed bit always changes
    it; several changes collide only if their word deltas cancel in both sums.
    """
    rows = tensor.shape[0] if tensor.dim() > 0 else 1
    flat = tensor.detach().contiguous().reshape(rows, -1)
    if flat.element_size() % 2:
        raise ValueError(f"cannot fingerprint dtype {tensor.dtype} (needs 2-byte multiples)")
    words = flat.view(torch.int16)
    weights = torch.arange(words.shape[1], device=words.device) % FINGERPRINT_MODULUS + 1
    step = max(1, FINGERPRINT_CHUNK // max(1, words.shape[1]))
    parts = []
    for start in range(0, rows, step):
        block = words[start : start + step].to(torch.int64)
        parts.append(torch.stack([block.sum(1), (block * weights).sum(1)], dim=1).cpu())
    return torch.cat(parts) if parts else torch.zeros(0, 2, dtype=torch.int64)


def changed_rows(previous: torch.Tensor | None, current: torch.Tensor) -> torch.Tensor:
    """Sorted int64 indices of rows whose fingerprints differ (all rows when ``previous`` is
    None or of another shape)."""
    if previous is None or previous.shape != current.shape:
        return torch.arange(current.shape[0])
    return (previous != current).any(dim=1).nonzero().flatten()


@dataclass(frozen=True, kw_only=True)
class RowDelta:
    """An update of tensor ``name`` as whole rows: ``tensor[rows] = values``."""

    name: str
    rows: torch.Tensor
    """int64 [k] row indices (first dimension)."""
    values: torch.Tensor
    """[k, ...] the new rows."""


def row_delta(name: str, tensor: torch.Tensor, rows: torch.Tensor) -> RowDelta:
    """The rows ``rows`` of the new ``tensor`` as a :class:`RowDelta`."""
    rows = rows.to(tensor.device)
    return RowDelta(name=name, rows=rows, values=tensor.index_select(0, rows))


def apply_row_delta(target: torch.Tensor, delta: RowDelta) -> None:
    """Writes ``delta`` into ``target`` (the receiver's copy of the old tensor), in place."""
    target.index_copy_(0, delta.rows.to(target.device), delta.values.to(target))


@dataclass(kw_only=True)
class RefitStats:
    """What one refit sent (the same on every rank)."""

    num_tensors: int = 0
    num_changed: int = 0
    """Tensors with at least one changed row."""
    num_sent: int = 0
    """Tensors sent: the changed ones and their fused siblings (:func:`vllm_module`)."""
    bytes_sent: int = 0
    rows_total: int = 0
    rows_changed: int = 0
    qk_rows_total: int = 0
    qk_rows_changed: int = 0
    seconds: float = 0.0

    def metrics(self) -> dict[str, float]:
        return {
            "refit/tensors_changed": float(self.num_changed),
            "refit/tensors_sent": float(self.num_sent),
            "refit/gib_sent": self.bytes_sent / 2**30,
            "refit/rows_changed_frac": self.rows_changed / max(1, self.rows_total),
            "refit/qk_rows_changed_frac": self.qk_rows_changed / max(1, self.qk_rows_total),
            "refit/seconds": self.seconds,
        }


_FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
          "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}  # fmt: skip
_HF_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.\d+\.")


def vllm_module(name: str) -> str:
    """The vLLM module HF tensor ``name`` loads into: q/k/v (weights and biases) share the
    fused ``qkv_proj``, gate/up the fused ``gate_up_proj``, all routed experts of an MoE layer
    (``mlp.experts.{e}.*``) its one ``FusedMoE`` ``mlp.experts`` (``w13_weight`` /
    ``w2_weight`` [E, ...]); any other tensor its own module.
    vLLM's in-place reload processes a module once all of its elements have arrived and
    rebuilds the rest uninitialised (vLLM 0.32 ``model_executor/model_loader/reload/
    layerwise.py``, ``make_online_process_loader`` and ``finalize_layerwise_processing``), so
    a refit sends a module whole or not at all."""
    if (experts := _HF_EXPERT.match(name)) is not None:
        return experts.group(1)
    prefix, _, _ = name.rpartition(".")
    parent, _, proj = prefix.rpartition(".")
    return f"{parent}.{_FUSED[proj]}" if proj in _FUSED else prefix


class ChangeTracker:
    """Remembers a fingerprint per HF tensor and reports what changed since the last look."""

    def __init__(self) -> None:
        self._fingerprints: dict[str, torch.Tensor] = {}

    def diff(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Rows of ``tensor`` changed since the previous call for ``name`` (all rows on the
        first); records the new fingerprint. No collectives."""
        current = row_fingerprints(tensor)
        rows = changed_rows(self._fingerprints.get(name), current)
        self._fingerprints[name] = current
        return rows

    def changed(
        self, tensors: Iterable[tuple[str, torch.Tensor]], *, stats: RefitStats | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Passes on the tensors of every vLLM module (:func:`vllm_module`) with at least one
        changed row, the module's unchanged tensors included; counts into ``stats``. A
        module's tensors must come consecutively (they do from
        :func:`iter_hf_tensors_from_model`). Consume it to the end (the source may be
        collective)."""
        stats = RefitStats() if stats is None else stats
        module, pending, module_changed = None, [], False
        for name, tensor in tensors:
            if vllm_module(name) != module:
                if module_changed:
                    yield from self._send(pending, stats)
                module, pending, module_changed = vllm_module(name), [], False
            rows = self.diff(name, tensor)
            num_rows = tensor.shape[0] if tensor.dim() > 0 else 1
            stats.num_tensors += 1
            stats.rows_total += num_rows
            stats.rows_changed += len(rows)
            if name.endswith(_QK_SUFFIXES):
                stats.qk_rows_total += num_rows
                stats.qk_rows_changed += len(rows)
            if len(rows):
                stats.num_changed += 1
                module_changed = True
            pending.append((name, tensor))
        if module_changed:
            yield from self._send(pending, stats)

    @staticmethod
    def _send(pending, stats: RefitStats) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in pending:
            stats.num_sent += 1
            stats.bytes_sent += tensor.numel() * tensor.element_size()
            yield name, tensor
