"""What the spawned gloo worlds of the LongAct tests run: probes that drive real megatron
objects and return what they saw (dicts of CPU tensors and floats; keys in each docstring),
and the three worlds conftest.py starts once per session. The tests hold every check.

A probe that raises leaves its traceback in its place and the world goes on, so only the tests
that read that probe fail (:class:`Observations`). One that raises on some ranks only leaves
the others in a collective until ``parallel.collective_timeout_s`` ends the world.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
import torch
from longact_helpers import (
    SEED,
    SEQ,
    InputCapture,
    build,
    cp_reduction_batches,
    forward_step,
    full_qkv,
    global_rows,
    make_job,
    micro_batches,
    qkv_modules,
    reinit,
    train_steps,
)

LAYOUT_ARCHS = ("gqa", "mha_bias", "one_group")
"""The conftest ``arch_dirs`` whose fused-QKV layout is checked against megatron's split."""


# ---- probes -------------------------------------------------------------------------------


@torch.no_grad()
def layout_probe(overrides: list[str]) -> dict:
    """Layer 0's attention on x [s=5, b=2, h]: megatron's own split ``query`` / ``key`` /
    ``value`` [s, b, heads or groups of this rank, D]; ``full``, x through the TP-gathered
    weight (and bias) [s, b, (N+2G)D]; ``q_normed`` / ``k_normed``, ``full`` through the
    layer's q / k layernorm per D-slot (as ``full`` without one); ``local``, this rank's
    linear_qkv output [s, b, (N+2G)D / TP]; the ``layout`` and ``tp_rank``."""
    from megatron_longact.models.gpt import (
        build_gpt_model,
        load_architecture,
        make_transformer_config,
    )
    from megatron_longact.models.qkv_layout import QKVLayout
    from megatron_longact.runtime.params import gather_tensor_parallel

    job = make_job(overrides)
    dims = reinit(job)
    arch = load_architecture(job.model)
    tconfig = make_transformer_config(arch, model=job.model, parallel=job.parallel, train=job.train)
    torch.manual_seed(SEED)
    attention = build_gpt_model(arch, tconfig, model=job.model).decoder.layers[0].self_attention
    x = torch.randn(5, 2, arch.hidden_size, generator=torch.Generator().manual_seed(0))
    query, key, value = attention.get_query_key_value_tensors(x)
    full = x @ gather_tensor_parallel(attention.linear_qkv.weight).t()
    if attention.linear_qkv.bias is not None:
        full = full + gather_tensor_parallel(attention.linear_qkv.bias)
    slots = full.unflatten(-1, (-1, arch.head_dim))
    normed = {}
    for name in ("q", "k"):
        norm = getattr(attention, f"{name}_layernorm")
        normed[name] = full if norm is None else norm(slots).flatten(-2)
    return {
        "query": query, "key": key, "value": value, "full": full,
        "q_normed": normed["q"], "k_normed": normed["k"], "local": attention.linear_qkv(x)[0],
        "layout": QKVLayout.from_transformer_config(tconfig), "tp_rank": dims.tp_rank,
    }  # fmt: skip


def saliency_probe(overrides: list[str], *, packed: bool, mbs: int) -> dict:
    """One LongAct step on global batch 0 (padded rows or packed bins): the controller's M
    ``measured`` and ``selection`` ({layer: {projection: [heads, D]}}), ``all_stages`` (M
    gathered over the pipeline group), ``metrics``; ``fires`` ({layer: linear_qkv forwards});
    this rank's captured qkv ``inputs`` ({layer: [rows, S, h]}); the full qkv ``weights``
    before the step (longact_helpers.full_qkv); the ``layout`` and ``dims``."""
    from megatron_longact.longact import LongActController

    job = make_job(overrides)
    state = build(job)
    controller = LongActController.from_train_state(job.longact, state)
    weights = full_qkv(state)
    capture = InputCapture(state)
    train_steps(state, controller, steps=1, packed=packed, mbs=mbs)
    capture.close()
    controller.close()
    return {
        "measured": controller.saliency, "selection": controller.selection,
        "all_stages": controller.saliency_all_stages(), "metrics": controller.metrics(),
        "fires": dict(capture.fires), "inputs": capture.rows(), "weights": weights,
        "layout": controller.layout, "dims": state.dims,
    }  # fmt: skip


def grad_mode_probe(overrides: list[str]) -> dict:
    """Two grad-mode steps (padded, micro-batches of 2). Per step: ``dense_norm`` / ``masked_norm``,
    the L2 norm of all main_grads before / after LongAct masks them; ``grad_norm``, the norm
    train_step reports; and at optimizer time the ``selection`` and the qkv ``main_grads``
    ({layer: {"weight"/"bias": tensor}}). Also ``lr`` of step 0, the full qkv weights
    ``before`` and ``after`` step 0 ({layer: [(N+2G)D, h]}), ``metrics`` and ``layout``."""
    from megatron_longact.longact import LongActController

    job = make_job(overrides)
    state = build(job)
    tconfig = state.transformer_config
    seen = {"dense_norm": [], "masked_norm": [], "selection": [], "main_grads": []}

    def norm_after(finalize, key):  # wraps a finalize_model_grads_func
        def wrapped(*args, **kwargs):
            out = finalize(*args, **kwargs)
            grads = [p.main_grad.double() for p in state.model[0].parameters()]
            seen[key].append(float(sum(g.pow(2).sum() for g in grads)) ** 0.5)
            return out

        return wrapped

    tconfig.finalize_model_grads_func = norm_after(tconfig.finalize_model_grads_func, "dense_norm")
    controller = LongActController.from_train_state(job.longact, state)  # wraps it in turn
    tconfig.finalize_model_grads_func = norm_after(tconfig.finalize_model_grads_func, "masked_norm")
    modules = qkv_modules(state)

    def at_optimizer(*_args):
        seen["selection"].append(controller.selection)
        seen["main_grads"].append({
            n: {"weight": q.weight.main_grad.clone(),
                "bias": None if q.bias is None else q.bias.main_grad.clone()}
            for n, q in modules.items()
        })  # fmt: skip

    for sub in getattr(state.optimizer, "chained_optimizers", [state.optimizer]):
        sub.optimizer.register_step_pre_hook(at_optimizer)
    before = full_qkv(state)
    results = train_steps(state, controller, steps=1, packed=False, mbs=2)
    after = full_qkv(state)
    results += train_steps(state, controller, steps=1, packed=False, mbs=2, first_step=1)
    controller.close()
    return {
        **seen, "grad_norm": [r.grad_norm for r in results], "lr": results[0].lr,
        "before": {n: w for n, (w, _) in before.items()},
        "after": {n: w for n, (w, _) in after.items()},
        "metrics": controller.metrics(), "layout": controller.layout,
    }  # fmt: skip


def _shard_ranges(state) -> dict[int, tuple[int, int]]:
    """{layer: (start, end)}: the flat range of each qkv weight in this rank's shard of the
    distributed optimizer (none with megatron's plain optimizer)."""
    out = {}
    for number, qkv in qkv_modules(state).items():
        for sub in getattr(state.optimizer, "chained_optimizers", [state.optimizer]):
            if (
                hasattr(sub, "_get_model_param_range_map")
                and qkv.weight in sub.model_param_gbuf_map
            ):
                param_range = sub._get_model_param_range_map(qkv.weight)["param"]
                out[number] = (param_range.start, param_range.end)
    return out


def _adam_states(state) -> dict[int, dict[str, torch.Tensor]]:
    """{layer: {"exp_avg"/"exp_avg_sq": [(N+2G)D, h]}} of each qkv weight; one process with
    the distributed optimizer (its shard is then the whole parameter)."""
    out = {}
    for number, qkv in qkv_modules(state).items():
        for sub in getattr(state.optimizer, "chained_optimizers", [state.optimizer]):
            for model_group, main_group in zip(sub.model_fp32_groups, sub.shard_fp32_groups):
                for param, main in zip(model_group, main_group):
                    if param is qkv.weight:
                        adam = sub.optimizer.state[main]
                        out[number] = {k: adam[k].view_as(param).clone()
                                       for k in ("exp_avg", "exp_avg_sq")}  # fmt: skip
    return out


def freeze_probe(overrides: list[str], *, mbs: int, steps: int = 3, adam: bool = False) -> dict:
    """Freeze-mode AdamW steps (padded). ``history``: per step the full qkv weights ``before``
    and ``after`` ({layer: [(N+2G)D, h]}), the ``selection`` it trained with and its M
    ``saliency``. Then all full ``params`` by name, the ``layout``, ``shard_ranges``
    (:func:`_shard_ranges`) and, with ``adam``, the qkv Adam states (:func:`_adam_states`)."""
    from megatron_longact.longact import LongActController
    from megatron_longact.runtime.params import full_named_parameters

    job = make_job(["longact.mode=freeze", *overrides])
    state = build(job)
    controller = LongActController.from_train_state(job.longact, state)
    history = []
    for step in range(steps):
        before = full_qkv(state)
        train_steps(state, controller, steps=1, packed=False, mbs=mbs, first_step=step)
        history.append({
            "before": {n: w for n, (w, _) in before.items()},
            "after": {n: w for n, (w, _) in full_qkv(state).items()},
            "selection": controller.selection, "saliency": controller.saliency,
        })  # fmt: skip
    controller.close()
    return {
        "history": history, "params": full_named_parameters(state.model[0]),
        "layout": controller.layout, "shard_ranges": _shard_ranges(state),
        "adam": _adam_states(state) if adam else None,
    }  # fmt: skip


def dense_probe(overrides: list[str], *, use_controller: bool) -> dict:
    """Two packed steps: per step (loss, grad norm) in ``losses``, then all full ``params``
    by name and the controller's ``metrics`` (empty without one)."""
    from megatron_longact.longact import LongActController
    from megatron_longact.runtime.params import full_named_parameters

    job = make_job(overrides)
    state = build(job)
    controller = LongActController.from_train_state(job.longact, state) if use_controller else None
    results = train_steps(state, controller, steps=2, packed=True, mbs=2)
    if controller is not None:
        controller.close()
    return {
        "losses": [(r.loss, r.grad_norm) for r in results],
        "params": full_named_parameters(state.model[0]),
        "metrics": {} if controller is None else controller.metrics(),
    }


def _observed_steps(overrides: list[str], *, steps: int) -> dict:
    """``steps`` padded steps with a controller for ``overrides``: per step the ``selection``
    and whether observe() handed the data iterator back untouched (``observed_is_plain``:
    nothing measured), then the final ``metrics``."""
    from megatron_longact.longact import LongActController

    job = make_job(overrides)
    state = build(job)
    controller = LongActController.from_train_state(job.longact, state)
    selection, observed_is_plain = [], []
    for step in range(steps):
        plain = iter([])
        observed_is_plain.append(controller.observe(plain) is plain)
        train_steps(state, controller, steps=1, packed=False, mbs=2, first_step=step)
        selection.append(controller.selection)
    controller.close()
    return {
        "selection": selection, "observed_is_plain": observed_is_plain,
        "metrics": controller.metrics(),
    }  # fmt: skip


def static_probe(folder: str) -> dict:
    """profile_saliency on global batch 0 (padded) into ``folder``, returning its M
    ``profile`` and the file read back (``loaded`` M, ``num_samples``), then two steps with
    schedule=static from that file (:func:`_observed_steps`)."""
    from megatron_longact.longact import load_saliency, profile_saliency

    path = f"{folder}/saliency.safetensors"
    state = build(make_job([]))
    rows = global_rows(0, state.arch.vocab_size, packed=False)
    profile = profile_saliency(
        state,
        micro_batches(rows, dp_rank=0, dp=1, mbs=2, packed=False),
        path=path,
        micro_batch_size=2,
        seq_length=SEQ,
        forward_step_func=forward_step,
    )
    loaded = load_saliency(path)
    static = ["longact.schedule=static", f"longact.static_saliency_path={path}"]
    return {
        "profile": profile.saliency, "loaded": loaded.saliency,
        "num_samples": loaded.num_samples, **_observed_steps(static, steps=2),
    }  # fmt: skip


def every_n_probe(folder: str) -> dict:
    """every_n_steps=2 with EMA 0.5, 3 packed steps: per step in ``steps`` the controller's
    ``saliency``, ``ema``, ``selection`` and ``metrics``; histograms written to ``folder``
    at step 3; the ``saved`` state_dict; ``fresh_step``, the step of a new controller that
    loaded a checkpoint without LongAct state; ``reloaded``, its state_dict after loading
    ``saved``; ``after_resume``, its selection after step 3 (no refresh there); ``tb_dir``."""
    from torch.utils.tensorboard import SummaryWriter

    from megatron_longact.longact import LongActController

    job = make_job(
        ["longact.schedule=every_n_steps", "longact.every_n_steps=2", "longact.ema_decay=0.5"]
    )
    state = build(job)
    controller = LongActController.from_train_state(job.longact, state)
    steps = []
    for step in range(3):
        train_steps(state, controller, steps=1, packed=True, mbs=2, first_step=step)
        steps.append({"saliency": controller.saliency, "ema": controller.ema,
                      "selection": controller.selection, "metrics": controller.metrics()})  # fmt: skip
    writer = SummaryWriter(log_dir=folder)
    controller.log_histograms(writer, step=3)
    writer.close()
    saved = controller.state_dict()
    controller.close()
    resumed = LongActController.from_train_state(job.longact, state)
    resumed.load_state_dict({})
    fresh_step = resumed.step
    resumed.load_state_dict(saved)
    reloaded = resumed.state_dict()
    train_steps(state, resumed, steps=1, packed=True, mbs=2, first_step=3)
    resumed.close()
    return {
        "steps": steps, "saved": saved, "fresh_step": fresh_step, "reloaded": reloaded,
        "after_resume": resumed.selection, "tb_dir": folder,
    }  # fmt: skip


def cp_reduction_probe() -> dict:
    """Feeds this CP rank's cut of longact_helpers.cp_reduction_batches through the
    SaliencyAccumulator; returns the reduced ``measured`` ({layer: [R]}) and ``num_samples``."""
    from megatron.core import parallel_state
    from megatron.core.utils import get_batch_on_this_cp_rank

    from megatron_longact.longact.meter import local_layout
    from megatron_longact.longact.saliency import SaliencyAccumulator, describe_micro_batch

    reinit(make_job(["parallel.context_parallel_size=2"]))
    cp = parallel_state.get_context_parallel_world_size()
    rank = parallel_state.get_context_parallel_rank()
    batches = cp_reduction_batches()
    first = batches[0]["acts"]
    acc = SaliencyAccumulator(list(first), num_local_rows=first[3].shape[-1],
                              cp_group=parallel_state.get_context_parallel_group())  # fmt: skip
    for batch in batches:
        thd = "cu_seqlens" in batch
        whole = {k: v for k, v in batch.items() if k != "acts"}
        # The whole micro-batch, as the data iterator yields it; the meter's cut must match.
        acc.begin_micro_batch(describe_micro_batch(whole, localize=partial(local_layout, thd=thd)))
        for n, act in batch["acts"].items():  # [b, S, R]
            if thd:  # megatron's THD split: chunks rank and 2cp - 1 - rank of every segment
                parts = [
                    p.chunk(2 * cp, dim=1)
                    for p in act.split(batch["cu_seqlens"].diff().tolist(), dim=1)
                ]
                local = torch.cat(
                    [c for p in parts for c in (p[rank], p[2 * cp - 1 - rank])], dim=1
                )
            else:
                local = get_batch_on_this_cp_rank({"act": act.clone()})["act"]
            acc.add(n, local.transpose(0, 1))  # -> [s, b, R]
    measured, num_samples = acc.reduce()
    return {"measured": measured, "num_samples": num_samples}


# ---- worlds -------------------------------------------------------------------------------


class ProbeFailed(str):
    """A probe's traceback, left in its place in a world's result."""


def run_probes(probes: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    """Runs each probe in turn: {name: what it returned, or ProbeFailed}."""
    out = {}
    for name, probe in probes.items():
        try:
            out[name] = probe()
        except Exception:
            out[name] = ProbeFailed(traceback.format_exc())
    return out


class Observations(dict):
    """A world's result for the tests: {probe name: [what it returned on rank 0, 1, ...]}.
    Reading a probe that raised fails the reading test with the rank's traceback."""

    def __init__(self, ranks: list[dict[str, Any]]) -> None:
        super().__init__({name: [r[name] for r in ranks] for name in ranks[0]})

    def __getitem__(self, name: str) -> list:
        per_rank = super().__getitem__(name)
        for rank, value in enumerate(per_rank):
            if isinstance(value, ProbeFailed):
                pytest.fail(f"probe {name!r} raised on rank {rank}:\n{value}", pytrace=False)
        return per_rank


def _arch(arch_dirs: dict[str, str], name: str) -> str:
    return f"model.hf_path={arch_dirs[name]}"


def world_single(arch_dirs: dict[str, str], folder: str) -> dict:
    """One process: the references every parallel world is compared against, and the
    single-process mode, strategy and schedule probes."""
    freeze_fp32 = ["parallel.use_distributed_optimizer=false"]
    return run_probes({
        **{f"layout_{a}": partial(layout_probe, [_arch(arch_dirs, a)]) for a in LAYOUT_ARCHS},
        "padded": partial(saliency_probe, [], packed=False, mbs=2),
        "packed": partial(saliency_probe, [], packed=True, mbs=2),
        "recompute": partial(saliency_probe, ["train.recompute=full"], packed=False, mbs=2),
        "grad": partial(grad_mode_probe, [_arch(arch_dirs, "mha_bias")]),
        "freeze": partial(freeze_probe, [_arch(arch_dirs, "partial")], mbs=2, adam=True),
        "freeze_fp32_optimizer": partial(freeze_probe, freeze_fp32, mbs=2, steps=2),
        "dense": partial(dense_probe, [], use_controller=False),
        "none": partial(dense_probe, ["longact.strategy=none"], use_controller=True),
        "ratio_one": partial(dense_probe, ["longact.ratio=1.0"], use_controller=True),
        "static": partial(static_probe, folder),
        "every_n": partial(every_n_probe, folder),
        "random": partial(_observed_steps, ["longact.strategy=random", "longact.targets=[q,k,v]",
                                            "longact.seed=5"], steps=2),
    })  # fmt: skip


def world_dp2(arch_dirs: dict[str, str]) -> dict:
    """2 ranks: DP=2 saliency and freeze (micro-batches of 1), the CP=2 reduction, and a
    PP=2 packed step (micro-qwen3: one layer per stage)."""
    return run_probes({
        "padded": partial(saliency_probe, [], packed=False, mbs=1),
        "packed": partial(saliency_probe, [], packed=True, mbs=1),
        "freeze": partial(freeze_probe, [_arch(arch_dirs, "partial")], mbs=1),
        "cp_reduction": cp_reduction_probe,
        "pipeline": partial(saliency_probe, ["parallel.pipeline_model_parallel_size=2"],
                            packed=True, mbs=2),
    })  # fmt: skip


def world_tp2_dp2(arch_dirs: dict[str, str]) -> dict:
    """4 ranks, TP=2 x DP=2: layout, saliency (micro-batches of 1), and freeze with the
    distributed optimizer and overlap_grad_reduce."""
    tp2 = ["parallel.tensor_model_parallel_size=2"]
    overlap = [*tp2, _arch(arch_dirs, "partial"), "parallel.overlap_grad_reduce=true"]
    return run_probes({
        **{f"layout_{a}": partial(layout_probe, [*tp2, _arch(arch_dirs, a)])
           for a in LAYOUT_ARCHS},
        "padded": partial(saliency_probe, tp2, packed=False, mbs=1),
        "packed": partial(saliency_probe, tp2, packed=True, mbs=1),
        "freeze": partial(freeze_probe, overlap, mbs=1),
    })  # fmt: skip
