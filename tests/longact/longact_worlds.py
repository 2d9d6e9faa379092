"""The entry points of the spawned gloo worlds the fixtures in conftest.py start, one per world
(module level so that spawned children can import them). Each batches many cases (a spawn costs
~10 s) and returns one frozen dataclass per rank; the cases live in longact_saliency_cases.py
and longact_training_cases.py."""

from __future__ import annotations

from dataclasses import dataclass

from longact_helpers import make_job, reinit
from longact_saliency_cases import (
    CPReduction,
    LayoutErrors,
    SaliencyRun,
    cp_reduction_case,
    layout_errors,
    saliency_case,
)
from longact_training_cases import (
    DenseRun,
    EveryNRun,
    FreezeRun,
    GradModeRun,
    RandomRun,
    StaticRun,
    dense_equivalence_case,
    every_n_case,
    freeze_case,
    grad_mode_case,
    random_case,
    static_case,
)


def world_freeze(overrides: list[str], mbs: int) -> FreezeRun:
    """Freeze mode in this world, its parallel state set up for ``overrides`` first."""
    job = make_job(["longact.mode=freeze", *overrides])
    return freeze_case(job, reinit(job), mbs=mbs)


@dataclass(frozen=True)
class SaliencyWorld:
    """Layout checks and measured saliency of one rank."""

    dims: tuple[int, int]
    """(TP, DP) of the world."""
    tp_rank: int
    """This rank's tensor-parallel rank."""
    layout: dict[str, LayoutErrors]
    """Per architecture name (conftest ``arch_dirs``): formula against megatron's split."""
    padded: SaliencyRun
    """One step on padded single samples."""
    packed: SaliencyRun
    """One step on packed bins."""
    recompute: SaliencyRun | None
    """One padded step with ``train.recompute=full``; single process only, else None."""


def world_saliency(arch_dirs: dict[str, str], *, overrides: list[str], mbs: int) -> SaliencyWorld:
    """Layout checks for every arch, then padded and packed saliency (and, single-process,
    the reference and a full-recompute run)."""
    job = make_job(overrides)
    dims = reinit(job)
    single = dims.world_size == 1
    layout = {
        name: layout_errors(make_job([*overrides, f"model.hf_path={folder}"]))
        for name, folder in arch_dirs.items()
    }
    padded = saliency_case(job, dims, packed=False, mbs=mbs, reference=single)
    packed = saliency_case(job, dims, packed=True, mbs=mbs, reference=single)
    recompute = None
    if single:
        recompute = saliency_case(
            make_job([*overrides, "train.recompute=full"]),
            dims,
            packed=False,
            mbs=mbs,
            reference=False,
        )
    return SaliencyWorld(
        dims=(dims.tp, dims.dp),
        tp_rank=dims.tp_rank,
        layout=layout,
        padded=padded,
        packed=packed,
        recompute=recompute,
    )


@dataclass(frozen=True)
class SingleWorld:
    """One process: the references every parallel world is compared against."""

    saliency: SaliencyWorld
    """Layout (all archs but ``partial``), padded / packed / recompute saliency with references."""
    grad: GradModeRun
    """Grad mode on the MHA-with-bias arch."""
    freeze: FreezeRun
    """Freeze mode, distributed optimizer, on the ``partial`` arch (hidden 40)."""
    freeze_fp32_optimizer: FreezeRun
    """Freeze mode with megatron's plain (non-distributed) fp32 optimizer, two steps."""
    dense: DenseRun
    """Dense training without a controller."""
    none: DenseRun
    """``longact.strategy=none``."""
    ratio_one: DenseRun
    """``longact.ratio=1.0``."""
    static: StaticRun
    """schedule=static from a profiled file."""
    every_n: EveryNRun
    """every_n_steps=2 with EMA, histograms and a state_dict round trip."""
    random: RandomRun
    """strategy=random with V targeted."""


def world_single(arch_dirs: dict[str, str], folder: str) -> SingleWorld:
    """One process: the references (layout, saliency by definition, freeze), grad mode, the
    fp32-optimizer freeze, dense equivalence, static schedule, every_n_steps + EMA."""
    layouts = {k: v for k, v in arch_dirs.items() if k != "partial"}
    saliency = world_saliency(layouts, overrides=[], mbs=2)
    dims = reinit(make_job([]))
    return SingleWorld(
        saliency=saliency,
        grad=grad_mode_case(make_job([f"model.hf_path={arch_dirs['mha_bias']}"]), dims),
        freeze=freeze_case(
            make_job(["longact.mode=freeze", f"model.hf_path={arch_dirs['partial']}"]), dims, mbs=2
        ),
        freeze_fp32_optimizer=freeze_case(
            make_job(["longact.mode=freeze", "parallel.use_distributed_optimizer=false"]),
            dims,
            mbs=2,
            steps=2,
        ),
        dense=dense_equivalence_case([], dims, use_controller=False),
        none=dense_equivalence_case(["longact.strategy=none"], dims, use_controller=True),
        ratio_one=dense_equivalence_case(["longact.ratio=1.0"], dims, use_controller=True),
        static=static_case(folder, dims),
        every_n=every_n_case(folder, dims),
        random=random_case(dims),
    )


@dataclass(frozen=True)
class DP2World:
    """One of 2 ranks: DP=2 saliency and freeze, the CP=2 reduction, and PP=2 saliency."""

    saliency: SaliencyWorld
    """DP=2 padded / packed saliency (micro-batches of 1), no layout checks."""
    freeze: FreezeRun
    """Freeze mode on the ``partial`` arch: its qkv rows straddle the DP shards."""
    cp: CPReduction
    """The CP=2 reduction of hand-made chunks."""
    pipeline: SaliencyRun
    """PP=2 packed step; each stage's reference covers its own layer."""
    pp_rank: int
    """This rank's pipeline stage in the PP=2 case (micro-qwen3: one layer per stage)."""


def world_dp2(arch_dirs: dict[str, str]) -> DP2World:
    """2 ranks, DP=2: saliency and freeze (micro-batches of 1), then CP=2 reduction."""
    saliency = world_saliency({}, overrides=[], mbs=1)
    freeze = world_freeze([f"model.hf_path={arch_dirs['partial']}"], mbs=1)
    reinit(make_job(["parallel.context_parallel_size=2"]))
    cp = cp_reduction_case()
    job = make_job(["parallel.pipeline_model_parallel_size=2"])
    dims = reinit(job)
    # Each stage checks its own layer against the definition (its own weights and inputs).
    pipeline = saliency_case(job, dims, packed=True, mbs=2, reference=True)
    return DP2World(
        saliency=saliency, freeze=freeze, cp=cp, pipeline=pipeline, pp_rank=dims.pp_rank
    )


@dataclass(frozen=True)
class TP2DP2World:
    """One of 4 ranks, TP=2 x DP=2."""

    saliency: SaliencyWorld
    """Layout (all archs but ``partial``) and padded / packed saliency (micro-batches of 1)."""
    freeze: FreezeRun
    """Freeze mode with the distributed optimizer and overlap_grad_reduce."""


def world_tp2_dp2(arch_dirs: dict[str, str]) -> TP2DP2World:
    """4 ranks, TP=2 x DP=2: layout, saliency, and freeze with the distributed optimizer and
    overlap_grad_reduce."""
    layouts = {k: v for k, v in arch_dirs.items() if k != "partial"}
    overrides = ["parallel.tensor_model_parallel_size=2"]
    saliency = world_saliency(layouts, overrides=overrides, mbs=1)
    freeze = world_freeze(
        [*overrides, f"model.hf_path={arch_dirs['partial']}", "parallel.overlap_grad_reduce=true"],
        mbs=1,
    )
    return TP2DP2World(saliency=saliency, freeze=freeze)
