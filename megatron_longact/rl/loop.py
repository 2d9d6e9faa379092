"""The RL loop (DAPO by default; GRPO, Clip-Cov, KL-Cov) with LongAct masks: one function.

The step body is ``rl/step.py``; the loop itself (logging every ``train.log_interval`` steps,
progress, per-interval callbacks, the save point) is the skeleton the SFT loop uses too,
``runtime.loop.run_loop``.
"""

from __future__ import annotations

from functools import partial

from megatron_longact.config.schema import JobConfig
from megatron_longact.rl.heldout import HeldOutEval
from megatron_longact.rl.reward_spec import resolve_reward
from megatron_longact.rl.step import RLRun, rl_step, setup_rl
from megatron_longact.runtime.loop import Every, Metrics, run_loop
from megatron_longact.runtime.metrics import MetricsWriter


def _describe(metrics: Metrics | None) -> str:
    if metrics is None:
        return "no group kept"
    return f"reward {metrics['rollout/reward_mean']:.3f} acc {metrics['rollout/accuracy']:.2f}"


def _log_histograms(run: RLRun, writer: MetricsWriter, step: int) -> None:
    if writer.tb is not None:
        run.longact.log_histograms(writer.tb, step=step)


def interval_callbacks(run: RLRun, held_out: HeldOutEval | None) -> list[Every]:
    """What runs every N RL steps besides the step: the held-out evaluation
    (``rl.eval_interval``), also on the start model (step 0, unless ``rl.eval_at_start`` is
    off) and after the last step."""
    if held_out is None:
        return []
    return [Every(held_out.interval, lambda step: held_out.evaluate(run),
                  at_start=held_out.at_start, at_last=True)]  # fmt: skip


def run_rl(job: JobConfig, *, config_yaml: str = "") -> Metrics:
    """Trains ``train.train_steps`` RL steps from ``checkpoint.load_dir`` (the SFT model), or
    from the HF weights of ``model.hf_path``; resumes from ``checkpoint.save_dir``. Returns the
    last step's metrics. All ranks run it."""
    resolve_reward(job.rl.reward)  # a bad rl.reward fails before anything is built
    held_out = HeldOutEval.from_job(job)  # None unless rl.eval_interval > 0; checks its file
    run = setup_rl(job)
    try:
        return run_loop(job, run.state, lambda step: rl_step(run, step=step), name="rl",
                        describe=_describe, every=interval_callbacks(run, held_out),
                        after_log=partial(_log_histograms, run),
                        checkpoint_extra=lambda: {"longact": run.longact.pipeline_state_dict()},
                        config_yaml=config_yaml)  # fmt: skip
    finally:
        run.engine.close()
