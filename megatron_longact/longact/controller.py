"""The one object a training loop talks to: measure -> select -> apply, once per step.

Usage (any algorithm: SFT, DAPO, ...)::

    controller = LongActController.from_train_state(job.longact, state)   # all ranks
    for step in ...:
        data_iterator = controller.observe(data_iterator)                 # measure
        result = train_step(state, data_iterator=data_iterator, ...)      # select + apply
        log(controller.metrics())

``observe`` arms forward hooks on every ``linear_qkv`` for the micro-batches of the step.
Selection and masking run inside megatron's ``config.finalize_model_grads_func``, which this
controller wraps: after the DP gradient reduce(-scatter), before clipping and
``optimizer.step()``. There M is reduced over DP (and gathered over TP), the masks chosen and
the masked rows of ``main_grad`` zeroed. With ``mode=freeze`` the optimizer hooks of
:mod:`freeze` additionally keep masked rows and their Adam states still.

``strategy=none`` installs nothing: ``observe`` returns the iterator unchanged and the run is
the dense run, bit for bit.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch
import torch.distributed as dist

from megatron_longact.config.schema import LongActConfig
from megatron_longact.errors import UserError
from megatron_longact.longact.freeze import OptimizerFreezer
from megatron_longact.longact.masks import jaccard, local_row_mask, mask_gradients
from megatron_longact.longact.meter import SaliencyMeter, find_qkv_modules
from megatron_longact.longact.schedule import ema_update, refreshes_at
from megatron_longact.longact.selection import num_selected, random_generator, select_dims
from megatron_longact.models.qkv_layout import PROJECTIONS, QKVLayout

STATE_DICT_VERSION = 1
Saliency = dict[int, dict[str, torch.Tensor]]
"""``{global layer (0-based): {"q": [N, D], "k": [G, D], "v": [G, D]}}``, float32 on CPU."""
Selection = dict[int, dict[str, torch.Tensor]]
"""``{layer: {target projection: bool [heads, D]}}``, True = the row trains."""


class LongActController:
    """Saliency-guided sparse Q/K updates for the model chunk(s) of this rank.

    Args:
        config: the ``longact`` section of the job.
        model: megatron model chunks of this pipeline stage (DDP-wrapped).
        transformer_config: their ``TransformerConfig``; its ``finalize_model_grads_func`` is
            wrapped (must be set, as :func:`runtime.setup.setup_train_state` does).
        optimizer: the megatron optimizer (only used by ``mode=freeze``).

    Construct on every rank after the model and optimizer are built (no collectives, except
    that ``schedule=static`` reads the saliency file on every rank).
    """

    def __init__(
        self,
        config: LongActConfig,
        *,
        model: list[torch.nn.Module],
        transformer_config,
        optimizer=None,
    ) -> None:
        self.config = config
        self.step = 0
        self.enabled = config.strategy != "none"
        self.saliency: Saliency = {}
        self.ema: Saliency | None = None
        self.selection: Selection = {}
        self._metrics: dict[str, float] = {}
        self._meter: SaliencyMeter | None = None
        self._freezer: OptimizerFreezer | None = None
        self._transformer_config = transformer_config
        self._original_finalize = None
        if not self.enabled:
            return
        from megatron.core import parallel_state

        self.layout = QKVLayout.from_transformer_config(transformer_config)
        for projection in config.targets:  # a ratio that selects nothing fails now
            heads = self.layout.num_projection_heads(projection)
            per_head = config.selection_scope == "per_head"
            num_selected(config.ratio, self.layout.head_dim * (1 if per_head else heads))
        self.modules = find_qkv_modules(model)
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self._pp_group = parallel_state.get_pipeline_model_parallel_group()
        self._local_masks: dict[int, torch.Tensor] = {}
        self._previous: Selection = {}
        self._param_layer: dict[torch.nn.Parameter, int] = {}
        if config.strategy in ("massive", "min") and config.schedule != "static":
            self._meter = SaliencyMeter(model, layout=self.layout)
        if config.schedule == "static":
            self._init_static()
        if transformer_config.finalize_model_grads_func is None:
            raise ValueError(
                "transformer_config.finalize_model_grads_func is None, so megatron never calls "
                "LongAct's mask; set it to megatron.core.distributed.finalize_model_grads"
            )
        self._original_finalize = transformer_config.finalize_model_grads_func
        transformer_config.finalize_model_grads_func = self._finalize_model_grads
        if config.mode == "freeze":
            if optimizer is None:
                raise ValueError("longact.mode=freeze needs the megatron optimizer (optimizer=)")
            for number, qkv in self.modules.items():
                for param in (qkv.weight, getattr(qkv, "bias", None)):
                    if isinstance(param, torch.nn.Parameter) and param.requires_grad:
                        self._param_layer[param] = number
            self._freezer = OptimizerFreezer(
                optimizer, frozen_rows=self._frozen_rows, params=list(self._param_layer)
            )

    @classmethod
    def from_train_state(cls, config: LongActConfig, state) -> LongActController:
        """Builds the controller for a :class:`runtime.setup.TrainState`. All ranks."""
        return cls(
            config,
            model=state.model,
            transformer_config=state.transformer_config,
            optimizer=state.optimizer,
        )

    # ---- measure ---------------------------------------------------------------------------

    def observe(self, data_iterator: Iterator) -> Iterator:
        """Wraps this step's data iterator so the forward hooks measure its micro-batches.

        Returns ``data_iterator`` itself when nothing is measured this step (``none``,
        ``random``, ``static``, or a step between refreshes of ``every_n_steps``). Call on
        every rank before each ``train_step``; no collectives.
        """
        if self._meter is None or not self._refreshes():
            return data_iterator
        return self._meter.observe(data_iterator)

    def _refreshes(self) -> bool:
        if self.config.schedule != "static" and not self.selection:
            return True  # no mask yet (e.g. resumed from a state saved before any step)
        return refreshes_at(
            self.config.schedule, step=self.step, every_n_steps=self.config.every_n_steps
        )

    # ---- select ----------------------------------------------------------------------------

    def _select_from(self, saliency: Saliency, *, step: int) -> Selection:
        cfg = self.config
        selection = {}
        for number, per_projection in saliency.items():
            selection[number] = {}
            for projection in cfg.targets:
                generator = None
                if cfg.strategy == "random":
                    generator = random_generator(
                        cfg.seed, step=step, layer=number, projection=projection
                    )
                selection[number][projection] = select_dims(
                    per_projection[projection],
                    ratio=cfg.ratio,
                    strategy=cfg.strategy,
                    scope=cfg.selection_scope,
                    generator=generator,
                )
        return selection

    def _placeholder_saliency(self) -> Saliency:
        """Zeros of the right shapes, for strategies that do not read M (random)."""
        return {
            n: {
                p: torch.zeros(self.layout.num_projection_heads(p), self.layout.head_dim)
                for p in PROJECTIONS
            }
            for n in self.modules
        }

    def _init_static(self) -> None:
        from megatron_longact.longact.profile import load_saliency

        if self.config.strategy == "random":
            self._set_selection(self._select_from(self._placeholder_saliency(), step=0))
            return
        profile = load_saliency(self.config.static_saliency_path)
        missing = [n for n in self.modules if n not in profile.saliency]
        if missing:
            raise UserError(
                f"{self.config.static_saliency_path} has no saliency for layers {missing}; "
                "profile the same model (`longact saliency`)"
            )
        saliency = {n: profile.saliency[n] for n in self.modules}
        for number, per_projection in saliency.items():
            for projection, values in per_projection.items():
                expected = (self.layout.num_projection_heads(projection), self.layout.head_dim)
                if tuple(values.shape) != expected:
                    raise UserError(
                        f"{self.config.static_saliency_path}: layer {number} {projection} is "
                        f"{tuple(values.shape)}, the model needs {expected}"
                    )
        self.saliency = saliency
        self._set_selection(self._select_from(saliency, step=0))

    def _refresh(self) -> None:
        """Reduces this step's M (collective over DP and TP) and reselects."""
        if self._meter is None:  # random: no measurement
            self._set_selection(self._select_from(self._placeholder_saliency(), step=self.step))
            return
        rows, num_samples = self._meter.reduce()
        if num_samples == 0:
            raise ValueError(
                "LongAct measured no samples this step: pass the step's data iterator through "
                "controller.observe(...) before train_step (and give batches real tokens)"
            )
        measured = self._meter.split(rows)
        self.saliency = measured
        decay = self.config.ema_decay
        if decay > 0:
            previous = self.ema or {}
            self.ema = {
                n: {
                    p: ema_update(previous.get(n, {}).get(p), m, decay=decay)
                    for p, m in per.items()
                }
                for n, per in measured.items()
            }
        self._set_selection(self._select_from(self.ema or measured, step=self.step))

    def _set_selection(self, selection: Selection) -> None:
        self.selection = selection
        self._local_masks = {}
        for number, qkv in self.modules.items():
            mask = local_row_mask(self.layout, selection[number], tp_rank=self.tp_rank)
            self._local_masks[number] = mask.to(qkv.weight.device)

    # ---- apply -----------------------------------------------------------------------------

    def _finalize_model_grads(self, *args, **kwargs):
        """megatron's ``finalize_model_grads`` followed by LongAct; all ranks (collectives)."""
        result = self._original_finalize(*args, **kwargs)
        start = time.perf_counter()
        if self._refreshes():
            self._refresh()
        for number, qkv in self.modules.items():
            mask_gradients(qkv, self._local_masks[number])
        self._update_metrics(time.perf_counter() - start)
        self.step += 1
        return result

    def _frozen_rows(self, param: torch.nn.Parameter) -> torch.Tensor | None:
        number = self._param_layer.get(param)
        if number is None or number not in self._local_masks:
            return None
        return ~self._local_masks[number]

    # ---- observe ---------------------------------------------------------------------------

    def _update_metrics(self, seconds: float) -> None:
        metrics: dict[str, float] = {}
        for number, per_projection in self.selection.items():
            previous = self._previous.get(number, {})
            for projection, mask in per_projection.items():
                prefix = f"longact/layer{number:02d}/{projection}"
                metrics[f"{prefix}_trainable_frac"] = float(mask.float().mean())
                if projection in previous:
                    metrics[f"{prefix}_jaccard"] = jaccard(mask, previous[projection])
        self._previous = self.selection
        if dist.is_initialized() and dist.get_world_size(self._pp_group) > 1:
            gathered: list[dict] = [{} for _ in range(dist.get_world_size(self._pp_group))]
            dist.all_gather_object(gathered, metrics, group=self._pp_group)
            metrics = {k: v for part in gathered for k, v in part.items()}
        for kind in ("trainable_frac", "jaccard"):
            for projection in self.config.targets:
                values = [v for k, v in metrics.items() if k.endswith(f"/{projection}_{kind}")]
                if values:
                    metrics[f"longact/{projection}_{kind}"] = sum(values) / len(values)
        metrics["longact/select_ms"] = 1000.0 * seconds
        self._metrics = metrics

    def metrics(self) -> dict[str, float]:
        """Last step's per-layer trainable-row fraction and Jaccard overlap with the previous
        step's mask (``longact/layerNN/{q,k}_{trainable_frac,jaccard}``), their means over
        layers, and the time LongAct added to the step on this rank (``longact/select_ms``).
        All layers of all pipeline stages, identical on every rank; local, no collectives.
        Empty for ``strategy=none`` and before the first step."""
        return dict(self._metrics)

    def log_histograms(self, writer, *, step: int, saliency: Saliency | None = None) -> None:
        """Histograms of M per layer and projection to a TensorBoard ``SummaryWriter``.

        ``saliency`` defaults to this stage's last M (see :meth:`saliency_all_stages` for all
        stages). Local; call it on the ranks that own a writer.
        """
        for number, per_projection in sorted((saliency or self.saliency).items()):
            for projection, values in per_projection.items():
                writer.add_histogram(
                    f"longact/saliency/layer{number:02d}/{projection}",
                    values.flatten(),
                    global_step=step,
                )

    def saliency_all_stages(self) -> Saliency:
        """The last M of every layer of every pipeline stage. Collective over the pipeline
        group: all ranks must call it."""
        if not self.enabled or dist.get_world_size(self._pp_group) == 1:
            return dict(self.saliency)
        gathered: list[Saliency] = [{} for _ in range(dist.get_world_size(self._pp_group))]
        dist.all_gather_object(gathered, self.saliency, group=self._pp_group)
        return {n: per for part in gathered for n, per in part.items()}

    # ---- checkpoint ------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Step counter, last M, EMA and current masks of this stage's layers (CPU tensors,
        identical on every TP/DP rank of the stage; save it from any one of them)."""
        return {
            "version": STATE_DICT_VERSION,
            "step": self.step,
            "saliency": self.saliency,
            "ema": self.ema,
            "masks": {n: {p: m.cpu() for p, m in per.items()} for n, per in self.selection.items()},
        }

    def pipeline_state_dict(self) -> dict:
        """:meth:`state_dict` with every pipeline stage's layers merged (what a checkpoint's
        common state holds). Collective over the pipeline-parallel group."""
        state = self.state_dict()
        if not dist.is_initialized() or dist.get_world_size(self._pp_group_or_none()) == 1:
            return state
        parts: list[dict] = [None] * dist.get_world_size(self._pp_group_or_none())  # type: ignore[list-item]
        dist.all_gather_object(parts, state, group=self._pp_group_or_none())
        merged = dict(state)
        for key in ("saliency", "masks"):
            merged[key] = {n: v for part in parts for n, v in (part[key] or {}).items()}
        if state["ema"] is not None:
            merged["ema"] = {n: v for part in parts for n, v in (part["ema"] or {}).items()}
        return merged

    def _pp_group_or_none(self):
        from megatron.core import parallel_state

        return parallel_state.get_pipeline_model_parallel_group()

    def load_state_dict(self, state: dict) -> None:
        """Restores :meth:`state_dict`; entries for layers of other stages are ignored. An
        empty dict (a checkpoint written without LongAct) leaves the controller fresh."""
        if not state:
            return
        if state.get("version") != STATE_DICT_VERSION:
            raise UserError(
                f"LongAct state version {state.get('version')} is not "
                f"{STATE_DICT_VERSION}; it was written by another release"
            )
        self.step = int(state["step"])
        if not self.enabled:
            return
        mine = list(self.modules)
        self.saliency = {n: v for n, v in state["saliency"].items() if n in mine}
        self.ema = (
            None if state["ema"] is None else {n: v for n, v in state["ema"].items() if n in mine}
        )
        masks = {n: v for n, v in state["masks"].items() if n in mine}
        if masks:
            if sorted(masks) != sorted(mine):
                raise UserError(
                    f"LongAct state has masks for layers {sorted(masks)}, this "
                    f"stage holds {sorted(mine)}"
                )
            self._set_selection(masks)
            self._previous = masks

    def close(self) -> None:
        """Removes the hooks and restores ``finalize_model_grads_func`` (idempotent)."""
        if self._meter is not None:
            self._meter.close()
            self._meter = None
        if self._freezer is not None:
            self._freezer.close()
            self._freezer = None
        if self._original_finalize is not None:
            self._transformer_config.finalize_model_grads_func = self._original_finalize
            self._original_finalize = None
