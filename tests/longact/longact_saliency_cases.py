"""Saliency cases run inside the spawned gloo worlds of the LongAct tests: the fused-QKV layout
against megatron's split, one measured LongAct step (with its by-definition reference), and the
CP reduction. Module level so that spawned children can import them; results are frozen
dataclasses of CPU tensors / floats."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from longact_helpers import (
    SEED,
    InputCapture,
    PerLayer,
    build,
    full_qkv,
    global_rows,
    reference_saliency,
    train_steps,
)

from megatron_longact.config import JobConfig


@dataclass(frozen=True)
class LayoutErrors:
    """Max |formula - megatron| of layer 0 on one TP rank."""

    q: float
    """Query heads of this rank, after the q layernorm."""
    k: float
    """Key groups of this rank, after the k layernorm."""
    v: float
    """Value groups of this rank."""
    local_rows: float
    """This rank's slice of the fused output against ``layout.local_rows(rank)``."""
    q_shape: tuple[int, ...]
    """Shape of megatron's local query, [s, b, heads on this rank, D]."""


@dataclass(frozen=True)
class SaliencyRun:
    """One LongAct step and what the controller measured."""

    measured: PerLayer
    """The controller's M, {layer: {projection: [heads, D]}}."""
    fires: dict[int, int]
    """How often each layer's linear_qkv forward ran (recompute doubles it)."""
    masks: PerLayer
    """The controller's selection, {layer: {projection: bool [heads, D]}}."""
    metrics: dict[str, float]
    """``controller.metrics()``."""
    all_stages: PerLayer
    """M gathered over the pipeline group."""
    reference: PerLayer | None
    """M by the definition from unsharded activations; single-process worlds only."""


@dataclass(frozen=True)
class CPReduction:
    """The accumulator's M from hand-made CP chunks, and the reference from unsplit inputs."""

    measured: dict[int, torch.Tensor]
    """{layer: [R]} after the CP reduction."""
    num_samples: int
    """Samples with real tokens the accumulator counted."""
    reference: dict[int, torch.Tensor]
    """{layer: [R]} by the definition."""
    reference_samples: int
    """Samples with real tokens in the unsplit activations."""


@torch.no_grad()
def layout_errors(job: JobConfig) -> LayoutErrors:
    """Max |formula - megatron| for q, k, v of layer 0 on this TP rank, plus the local rows.

    q/k pass through the layer's own q/k layernorm, as megatron's split does.
    """
    from megatron.core import parallel_state

    from megatron_longact.models.gpt import (
        build_gpt_model,
        load_architecture,
        make_transformer_config,
    )
    from megatron_longact.models.qkv_layout import QKVLayout
    from megatron_longact.runtime.params import gather_tensor_parallel

    arch = load_architecture(job.model)
    tconfig = make_transformer_config(arch, model=job.model, parallel=job.parallel, train=job.train)
    torch.manual_seed(SEED)
    gpt = build_gpt_model(arch, tconfig, model=job.model)
    attention = gpt.decoder.layers[0].self_attention
    layout = QKVLayout.from_transformer_config(tconfig)
    x = torch.randn(5, 2, arch.hidden_size, generator=torch.Generator().manual_seed(0))
    query, key, value = attention.get_query_key_value_tensors(x)
    weight = gather_tensor_parallel(attention.linear_qkv.weight)
    full = x @ weight.t()
    if attention.linear_qkv.bias is not None:
        full = full + gather_tensor_parallel(attention.linear_qkv.bias)
    tp, rank = layout.tp_size, parallel_state.get_tensor_model_parallel_rank()
    ref = {p: full[..., layout.rows(p)] for p in ("q", "k", "v")}  # [s, b, heads, D]
    if attention.q_layernorm is not None:
        ref["q"] = attention.q_layernorm(ref["q"])
        ref["k"] = attention.k_layernorm(ref["k"])
    heads = layout.num_heads // tp
    q_local = ref["q"][:, :, rank * heads : (rank + 1) * heads]
    if layout.num_groups >= tp:
        groups = layout.num_groups // tp
        kv = slice(rank * groups, (rank + 1) * groups)
    else:  # ranks share a group
        group = rank // (tp // layout.num_groups)
        kv = slice(group, group + 1)
    local_out, _ = attention.linear_qkv(x)
    return LayoutErrors(
        q=float((query - q_local).abs().max()),
        k=float((key - ref["k"][:, :, kv]).abs().max()),
        v=float((value - ref["v"][:, :, kv]).abs().max()),
        local_rows=float((local_out - full[..., layout.local_rows(rank)]).abs().max()),
        q_shape=tuple(query.shape),
    )


def saliency_case(job: JobConfig, dims, *, packed: bool, mbs: int, reference: bool) -> SaliencyRun:
    """One LongAct step; returns the measured M (and the by-definition reference when the
    world is a single process)."""
    from megatron_longact.longact import LongActController

    state = build(job, dims)
    controller = LongActController.from_train_state(job.longact, state)
    weights = full_qkv(state)
    capture = InputCapture(state)
    train_steps(state, controller, steps=1, packed=packed, mbs=mbs)
    per_head = None
    if reference:
        rows = global_rows(0, state.arch.vocab_size, packed=packed)
        ref = reference_saliency(rows, capture.rows(), weights)
        per_head = {n: controller.layout.per_head(r.float()) for n, r in ref.items()}
    out = SaliencyRun(
        measured=controller.saliency,
        fires=dict(capture.fires),
        masks=controller.selection,
        metrics=controller.metrics(),
        all_stages=controller.saliency_all_stages(),
        reference=per_head,
    )
    capture.close()
    controller.close()
    return out


# ---- context parallel ---------------------------------------------------------------------

CP_ROWS = 12  # R of the hand-made activations
CP_LAYERS = (3, 5)
CP_PADDED_MASKS = [[16, 5, 0], [3, 16, 11]]  # real tokens per row, two micro-batches, S = 16
CP_THD_SEGMENTS = [(8, 2), (12, 12), (4, 0)]  # (padded length, real tokens) of one packed row


def _cp_chunks(x: torch.Tensor, *, cp: int, rank: int) -> torch.Tensor:
    """megatron's load-balanced CP split of dim 0: chunks ``rank`` and ``2cp - 1 - rank``."""
    chunks = x.chunk(2 * cp, dim=0)
    return torch.cat([chunks[rank], chunks[2 * cp - 1 - rank]])


def cp_reduction_case() -> CPReduction:
    """Feeds hand-made CP chunks (megatron's layout) through the accumulator; returns its M,
    the count and the by-definition reference from the unsplit activations."""
    from megatron.core import parallel_state
    from megatron.core.utils import get_batch_on_this_cp_rank

    from megatron_longact.longact.meter import local_layout
    from megatron_longact.longact.saliency import SaliencyAccumulator, describe_micro_batch

    dense, thd = partial(local_layout, thd=False), partial(local_layout, thd=True)

    cp = parallel_state.get_context_parallel_world_size()
    rank = parallel_state.get_context_parallel_rank()
    acc = SaliencyAccumulator(
        list(CP_LAYERS),
        num_local_rows=CP_ROWS,
        cp_group=parallel_state.get_context_parallel_group(),
    )
    gen = torch.Generator().manual_seed(7)
    roots = {n: [] for n in CP_LAYERS}

    def reference(acts, mask, segments):
        for n in CP_LAYERS:
            flat, start = acts[n], 0
            for length in segments:
                real = mask[start : start + length].bool()
                if real.any():
                    roots[n].append(
                        flat[start : start + length][real].double().pow(2).sum(0).sqrt()
                    )
                start += length

    for lengths in CP_PADDED_MASKS:  # bshd: b = 3, S = 16
        token_mask = (torch.arange(16)[None, :] < torch.tensor(lengths)[:, None]).float()
        acts = {n: torch.randn(3, 16, CP_ROWS, generator=gen) for n in CP_LAYERS}
        for b in range(3):
            reference({n: a[b] for n, a in acts.items()}, token_mask[b], [16])
        local = get_batch_on_this_cp_rank(
            {"token_mask": token_mask.clone(), **{f"act{n}": a.clone() for n, a in acts.items()}}
        )
        # The whole micro-batch, as the data iterator yields it; the meter's cut must match.
        acc.begin_micro_batch(describe_micro_batch({"token_mask": token_mask}, localize=dense))
        for n in CP_LAYERS:
            acc.add(n, local[f"act{n}"].transpose(0, 1))  # -> [s, b, R]

    # THD: one packed row, every segment padded to a multiple of 2 * cp, split per segment.
    lengths = [length for length, _ in CP_THD_SEGMENTS]
    token_mask = torch.cat(
        [(torch.arange(length) < real).float() for length, real in CP_THD_SEGMENTS]
    )
    acts = {n: torch.randn(sum(lengths), CP_ROWS, generator=gen) for n in CP_LAYERS}
    reference(acts, token_mask, lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)

    def split(x):
        return torch.cat([_cp_chunks(part, cp=cp, rank=rank) for part in x.split(lengths)])

    acc.begin_micro_batch(
        describe_micro_batch({"token_mask": token_mask[None, :], "cu_seqlens": cu}, localize=thd)
    )
    for n in CP_LAYERS:
        acc.add(n, split(acts[n])[:, None, :])  # [t, 1, R]
    measured, num_samples = acc.reduce()
    return CPReduction(
        measured=measured,
        num_samples=num_samples,
        reference={n: torch.stack(r).mean(0).float() for n, r in roots.items()},
        reference_samples=len(roots[CP_LAYERS[0]]),
    )
