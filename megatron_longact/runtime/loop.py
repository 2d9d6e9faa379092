"""The one training-loop skeleton ``run_sft`` and ``run_rl`` share.

Each loop sets up its own run (data, model, start weights: a :class:`~runtime.setup.TrainState`)
and writes its step function; :func:`run_loop` does the rest the same way for both: the
preflight of the output folders, one :class:`MetricsWriter` (closed in ``finally``, so an
exception does not lose buffered metrics or leave W&B open), the stop request, the progress
bar, per-interval callbacks, logging every ``train.log_interval`` steps and the save point.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from megatron_longact.checkpoint import preflight
from megatron_longact.config.schema import JobConfig
from megatron_longact.runtime.metrics import MetricsWriter, Progress, tensorboard_dir
from megatron_longact.runtime.save_point import save_point
from megatron_longact.runtime.setup import TrainState
from megatron_longact.runtime.signals import StopRequest

Metrics = dict[str, float]
StepFn = Callable[[int], Metrics | None]
"""Runs 1-based step ``step`` (all ranks) and returns its metrics, or None when the step made
no update (RL: dynamic sampling kept no group); it advances its own data counters in
``state.progress``, the skeleton advances ``progress.step``."""


@dataclass(frozen=True)
class Every:
    """A callback run after every ``interval``-th step (0 or less: never), on all ranks: the
    metrics ``fn(step)`` returns join that step's row, which is then logged whatever
    ``train.log_interval`` says (SFT's validation loss; RL's held-out evaluation)."""

    interval: int
    fn: Callable[[int], Metrics]
    at_start: bool = False
    """Also before the first step of a run that starts at step 0 (logged as step 0)."""
    at_last: bool = False
    """Also after the last step, ``train.train_steps``."""

    def due(self, step: int, *, last_step: int) -> bool:
        """Whether ``fn`` runs after step ``step`` (0: before the first)."""
        if self.interval <= 0:
            return False
        if step == 0:
            return self.at_start
        return step % self.interval == 0 or (self.at_last and step == last_step)


def run_loop(
    job: JobConfig,
    state: TrainState,
    step_fn: StepFn,
    *,
    name: str,
    describe: Callable[[Metrics | None], str],
    every: Sequence[Every] = (),
    after_log: Callable[[MetricsWriter, int], None] | None = None,
    checkpoint_extra: Callable[[], dict] | None = None,
    config_yaml: str = "",
) -> Metrics:
    """Runs steps ``state.progress.step + 1 .. train.train_steps``; returns the last step's
    metrics that were not None.

    Per step, in this order: ``step_fn(step)``; ``progress.step = step``; the due ``every``
    callbacks; every ``train.log_interval`` steps, or when a callback ran, the row is written,
    and every ``train.log_interval`` steps ``after_log(writer, step)`` runs (e.g. histograms);
    the progress bar shows ``describe(metrics or None)``; the save point (``checkpoint_extra()`` is saved beside the state; it runs every step, on every
    rank, since it may be collective). A stop requested by any rank ends the loop after the
    step's save. All ranks must call it.
    """
    last_step = job.train.train_steps
    preflight(save_dir=job.checkpoint.save_dir, model=state.model, with_optimizer=True,
              other_dirs={"logging.tensorboard_dir": tensorboard_dir(job)})  # fmt: skip
    writer = MetricsWriter(tensorboard_dir(job), wandb_project=job.logging.wandb_project)
    metrics: Metrics = {}
    try:
        stop = StopRequest()
        start = state.progress.step
        if start == 0 and (first := _callbacks(every, 0, last_step=last_step)):
            writer.log(first, step=0)  # the start model: a curve's first point
        with Progress(last_step, description=name, enabled=job.logging.progress,
                      start=start) as bar:  # fmt: skip
            for step in range(start + 1, last_step + 1):
                step_metrics = step_fn(step)
                state.progress.step = step
                fired = _callbacks(every, step, last_step=last_step)
                row = {**(step_metrics or {}), **fired}
                if row:
                    metrics = row
                    log_due = step % job.train.log_interval == 0
                    if log_due or fired:
                        writer.log(row, step=step)
                    if log_due and after_log is not None:
                        after_log(writer, step)
                bar.update(info=describe(step_metrics))
                extra = checkpoint_extra() if checkpoint_extra is not None else None
                if save_point(state, job.checkpoint, stop, step=step, last_step=last_step,
                              config_yaml=config_yaml, extra=extra):  # fmt: skip
                    break
    finally:
        writer.close()
    return metrics


def _callbacks(every: Sequence[Every], step: int, *, last_step: int) -> Metrics:
    """The metrics of the callbacks due after ``step``, merged in order."""
    row: Metrics = {}
    for callback in every:
        if callback.due(step, last_step=last_step):
            row.update(callback.fn(step))
    return row
