"""Training-mode cases run inside spawned worlds: grad mode, freeze, dense equivalence,
static schedule, every_n_steps + EMA + checkpoints. Each returns a frozen dataclass of CPU
tensors / floats."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from longact_helpers import (
    SEQ,
    PerLayer,
    build,
    forward_step,
    full_qkv,
    global_rows,
    make_job,
    micro_batches,
    qkv_modules,
    train_steps,
)

from megatron_longact.config import JobConfig
from megatron_longact.models.qkv_layout import QKVLayout


@dataclass(frozen=True)
class GradModeRun:
    """Two grad-mode steps (padded, micro-batches of 2), observed around the optimizer."""

    dense_norm: list[float]
    """Per step: L2 norm of all main_grads before LongAct masks them."""
    masked_norm: list[float]
    """Per step: the same norm after LongAct's masking."""
    grad_norm: list[float]
    """Per step: the norm megatron's train_step reports (and clips on)."""
    frozen_max: list[float]
    """Per step: max |main_grad| over masked qkv rows (weights and biases) at optimizer time."""
    trained_min: list[float]
    """Per step: min over trainable qkv rows of the row's max |main_grad|."""
    lr: float
    """The learning rate of step 0."""
    has_bias: bool
    """Whether every linear_qkv has a bias (its rows are masked too)."""
    first_frozen: dict[int, torch.Tensor]
    """{layer: global row indices} masked in step 0."""
    weight_before: dict[int, torch.Tensor]
    """{layer: full qkv weight [(N+2G)D, h]} before step 0."""
    weight_after: dict[int, torch.Tensor]
    """{layer: full qkv weight} after step 0."""
    metrics: dict[str, float]
    """``controller.metrics()`` after the last step."""


@dataclass(frozen=True)
class FreezeStep:
    """One freeze-mode step."""

    before: dict[int, torch.Tensor]
    """{layer: full qkv weight [(N+2G)D, h]} before the step."""
    after: dict[int, torch.Tensor]
    """{layer: full qkv weight} after the step."""
    masks: PerLayer
    """The selection the step trained with."""
    saliency: PerLayer
    """The M the selection came from."""


@dataclass(frozen=True)
class FreezeRun:
    """Several freeze-mode AdamW steps."""

    history: list[FreezeStep]
    """One entry per step."""
    params: dict[str, torch.Tensor]
    """All full (TP-gathered) parameters after the last step, by name."""
    layout: QKVLayout
    """The controller's fused-QKV layout."""
    partial_rows: bool
    """Whether a DP shard of the distributed optimizer cuts a qkv weight inside a row."""
    adam: dict[int, dict[str, torch.Tensor]] | None
    """{layer: {"exp_avg"/"exp_avg_sq": [(N+2G)D, h]}}; single process with the distributed
    optimizer only, else None."""


@dataclass(frozen=True)
class DenseRun:
    """Two packed steps, for bit-for-bit comparisons with dense training."""

    losses: list[tuple[float, float]]
    """Per step: (loss, grad norm)."""
    params: dict[str, torch.Tensor]
    """All full parameters after the last step, by name."""
    metrics: dict[str, float]
    """``controller.metrics()``; empty without a controller."""


@dataclass(frozen=True)
class StaticRun:
    """A saliency file profiled on step 0's batch, then two steps with schedule=static."""

    profile: PerLayer
    """M as profile_saliency returned it."""
    loaded: PerLayer
    """M read back from the file."""
    num_samples: int
    """Samples the file says were measured."""
    masks: list[PerLayer]
    """Per step: the selection trained with."""
    observed_is_plain: list[bool]
    """Per step: whether observe() returned the iterator unchanged (nothing measured)."""
    metrics: dict[str, float]
    """``controller.metrics()`` after the last step."""


@dataclass(frozen=True)
class EveryNStep:
    """The controller's state after one every_n_steps step."""

    saliency: PerLayer
    """This step's M (stale on steps that do not refresh)."""
    ema: PerLayer
    """The EMA of M."""
    masks: PerLayer
    """The selection."""
    metrics: dict[str, float]
    """``controller.metrics()``."""


@dataclass(frozen=True)
class EveryNRun:
    """every_n_steps=2, EMA 0.5, three steps, histograms, then a state_dict round trip."""

    steps: list[EveryNStep]
    """Steps 0, 1, 2."""
    saved: dict[str, Any]
    """``controller.state_dict()`` after step 2."""
    reloaded: dict[str, Any]
    """The state_dict of a fresh controller that loaded ``saved``."""
    after_resume: PerLayer
    """The resumed controller's selection after step 3 (no refresh at 3)."""
    fresh_step: int
    """The step of a controller that loaded a checkpoint without LongAct state."""
    tb_dir: str
    """The TensorBoard folder the histograms went to."""


@dataclass(frozen=True)
class RandomRun:
    """strategy=random with V targeted, two steps."""

    masks: list[PerLayer]
    """Per step: the selection."""
    observed_is_plain: list[bool]
    """Per step: whether observe() returned the iterator unchanged (nothing measured)."""


def frozen_rows(layout, selection: dict[str, torch.Tensor]) -> torch.Tensor:
    """Global row indices LongAct must keep still, computed from the layout formula."""
    rows = [layout.rows(p)[~mask] for p, mask in selection.items()]
    return torch.cat([r.flatten() for r in rows]).sort().values


def grad_norm(state) -> float:
    """L2 norm of all main_grads (TP = DP = PP = 1: every parameter counted once)."""
    total = sum(float(p.main_grad.double().pow(2).sum()) for p in state.model[0].parameters())
    return total**0.5


def _inner_optimizers(optimizer) -> list:
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    return [sub.optimizer for sub in subs]


def grad_mode_case(job: JobConfig, dims) -> GradModeRun:
    """Masked rows' main_grad at optimizer time, grad norms before/after masking, and what
    AdamW weight decay does to masked rows in grad mode."""
    from megatron_longact.longact import LongActController

    state = build(job, dims)
    tconfig = state.transformer_config
    dense_norm, masked_norm, frozen_maxes, trained_mins = [], [], [], []
    original = tconfig.finalize_model_grads_func

    def before_longact(*args, **kwargs):
        out = original(*args, **kwargs)
        dense_norm.append(grad_norm(state))
        return out

    tconfig.finalize_model_grads_func = before_longact
    controller = LongActController.from_train_state(job.longact, state)
    with_longact = tconfig.finalize_model_grads_func

    def after_longact(*args, **kwargs):
        out = with_longact(*args, **kwargs)
        masked_norm.append(grad_norm(state))
        return out

    tconfig.finalize_model_grads_func = after_longact
    modules = qkv_modules(state)

    def at_optimizer(*_args):
        frozen_max, trained_min = 0.0, float("inf")
        for number, qkv in modules.items():
            frozen = frozen_rows(controller.layout, controller.selection[number])
            trained = torch.ones(controller.layout.num_rows, dtype=torch.bool)
            trained[frozen] = False
            for param in (qkv.weight, qkv.bias):
                if param is None:
                    continue
                grad = param.main_grad.reshape(controller.layout.num_rows, -1)
                frozen_max = max(frozen_max, float(grad[frozen].abs().max()))
                trained_min = min(trained_min, float(grad[trained].abs().amax(dim=1).min()))
        frozen_maxes.append(frozen_max)
        trained_mins.append(trained_min)

    for inner in _inner_optimizers(state.optimizer):
        inner.register_step_pre_hook(at_optimizer)
    before = full_qkv(state)
    results = train_steps(state, controller, steps=1, packed=False, mbs=2)
    after = full_qkv(state)
    first_frozen = {n: frozen_rows(controller.layout, s) for n, s in controller.selection.items()}
    results += train_steps(state, controller, steps=1, packed=False, mbs=2, first_step=1)
    out = GradModeRun(
        dense_norm=dense_norm,
        masked_norm=masked_norm,
        frozen_max=frozen_maxes,
        trained_min=trained_mins,
        grad_norm=[r.grad_norm for r in results],
        lr=results[0].lr,
        has_bias=all(q.bias is not None for q in modules.values()),
        # Step 1's masked rows saw a zero gradient and no momentum: only weight decay acts.
        first_frozen=first_frozen,
        weight_before={n: w for n, (w, _) in before.items()},
        weight_after={n: w for n, (w, _) in after.items()},
        metrics=controller.metrics(),
    )
    controller.close()
    return out


def _qkv_exp_avg(state) -> dict[int, dict[str, torch.Tensor]]:
    """Adam states of each qkv weight (single process, distributed optimizer)."""
    out = {}
    for number, qkv in qkv_modules(state).items():
        for sub in getattr(state.optimizer, "chained_optimizers", [state.optimizer]):
            groups = zip(sub.model_fp32_groups, sub.shard_fp32_groups)
            for model_group, main_group in groups:
                for param, main in zip(model_group, main_group):
                    if param is qkv.weight:
                        st = sub.optimizer.state[main]
                        out[number] = {
                            k: st[k].view_as(param).clone() for k in ("exp_avg", "exp_avg_sq")
                        }
    return out


def freeze_case(job: JobConfig, dims, *, mbs: int, steps: int = 3) -> FreezeRun:
    """Several freeze-mode AdamW steps; per step the weights before/after and the masks."""
    from megatron_longact.longact import LongActController
    from megatron_longact.runtime.params import full_named_parameters

    state = build(job, dims)
    controller = LongActController.from_train_state(job.longact, state)
    history = []
    for step in range(steps):
        before = full_qkv(state)
        train_steps(state, controller, steps=1, packed=False, mbs=mbs, first_step=step)
        history.append(
            FreezeStep(
                before={n: w for n, (w, _) in before.items()},
                after={n: w for n, (w, _) in full_qkv(state).items()},
                masks=controller.selection,
                saliency=controller.saliency,
            )
        )
    partial_rows = False
    optimizers = getattr(state.optimizer, "chained_optimizers", [state.optimizer])
    for qkv in qkv_modules(state).values():
        for sub in optimizers:
            if (
                hasattr(sub, "_get_model_param_range_map")
                and qkv.weight in sub.model_param_gbuf_map
            ):
                rng = sub._get_model_param_range_map(qkv.weight)["param"]
                width = qkv.weight.shape[1]
                if rng.start % width or rng.end % width:
                    partial_rows = True
    single_distributed = dims.world_size == 1 and job.parallel.use_distributed_optimizer
    out = FreezeRun(
        history=history,
        params=full_named_parameters(state.model[0]),
        layout=controller.layout,
        partial_rows=partial_rows,
        adam=_qkv_exp_avg(state) if single_distributed else None,
    )
    controller.close()
    return out


def dense_equivalence_case(overrides: list[str], dims, *, use_controller: bool) -> DenseRun:
    """Two steps; losses and all parameters, for bit-for-bit comparisons."""
    from megatron_longact.longact import LongActController
    from megatron_longact.runtime.params import full_named_parameters

    job = make_job(overrides)
    state = build(job, dims)
    controller = LongActController.from_train_state(job.longact, state) if use_controller else None
    results = train_steps(state, controller, steps=2, packed=True, mbs=2)
    out = DenseRun(
        losses=[(r.loss, r.grad_norm) for r in results],
        params=full_named_parameters(state.model[0]),
        metrics={} if controller is None else controller.metrics(),
    )
    if controller is not None:
        controller.close()
    return out


def static_case(folder: str, dims) -> StaticRun:
    """Profiles M on step 0's batch into a file, then trains with schedule=static from it."""
    from megatron_longact.longact import LongActController, load_saliency, profile_saliency

    path = str(Path(folder) / "saliency.safetensors")
    job = make_job([])
    state = build(job, dims)
    rows = global_rows(0, state.arch.vocab_size, packed=False)
    profile = profile_saliency(
        state,
        micro_batches(rows, dp_rank=0, dp=1, mbs=2),
        path=path,
        micro_batch_size=2,
        seq_length=SEQ,
        forward_step_func=forward_step,
    )
    loaded = load_saliency(path)
    job = make_job(["longact.schedule=static", f"longact.static_saliency_path={path}"])
    state = build(job, dims)
    controller = LongActController.from_train_state(job.longact, state)
    masks, observed_is_plain = [], []
    for step in range(2):
        plain = iter([])
        observed_is_plain.append(controller.observe(plain) is plain)
        train_steps(state, controller, steps=1, packed=False, mbs=2, first_step=step)
        masks.append(controller.selection)
    out = StaticRun(
        profile=profile.saliency,
        loaded=loaded.saliency,
        num_samples=loaded.num_samples,
        masks=masks,
        observed_is_plain=observed_is_plain,
        metrics=controller.metrics(),
    )
    controller.close()
    return out


def every_n_case(folder: str, dims) -> EveryNRun:
    """every_n_steps=2 with EMA 0.5 for 3 steps, histograms, then a state_dict round trip."""
    from torch.utils.tensorboard import SummaryWriter

    from megatron_longact.longact import LongActController

    job = make_job(
        ["longact.schedule=every_n_steps", "longact.every_n_steps=2", "longact.ema_decay=0.5"]
    )
    state = build(job, dims)
    controller = LongActController.from_train_state(job.longact, state)
    steps = []
    for step in range(3):
        train_steps(state, controller, steps=1, packed=True, mbs=2, first_step=step)
        steps.append(
            EveryNStep(
                saliency=controller.saliency,
                ema=controller.ema,
                masks=controller.selection,
                metrics=controller.metrics(),
            )
        )
    writer = SummaryWriter(log_dir=folder)
    controller.log_histograms(writer, step=3)
    writer.close()
    saved = controller.state_dict()
    controller.close()
    resumed = LongActController.from_train_state(job.longact, state)
    resumed.load_state_dict({})  # a checkpoint without LongAct state: stays fresh
    fresh_step = resumed.step
    resumed.load_state_dict(saved)
    reloaded = resumed.state_dict()
    train_steps(state, resumed, steps=1, packed=True, mbs=2, first_step=3)  # no refresh at 3
    out = EveryNRun(
        steps=steps,
        saved=saved,
        reloaded=reloaded,
        after_resume=resumed.selection,
        fresh_step=fresh_step,
        tb_dir=folder,
    )
    resumed.close()
    return out


def random_case(dims) -> RandomRun:
    """strategy=random with V targeted too: per-step masks, and whether observe() measured."""
    from megatron_longact.longact import LongActController

    job = make_job(["longact.strategy=random", "longact.targets=[q,k,v]", "longact.seed=5"])
    state = build(job, dims)
    controller = LongActController.from_train_state(job.longact, state)
    masks, observed_is_plain = [], []
    for step in range(2):
        plain = iter([])
        observed_is_plain.append(controller.observe(plain) is plain)
        train_steps(state, controller, steps=1, packed=False, mbs=2, first_step=step)
        masks.append(controller.selection)
    controller.close()
    return RandomRun(masks=masks, observed_is_plain=observed_is_plain)
