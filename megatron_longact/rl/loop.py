"""The RL loop (DAPO by default; GRPO, Clip-Cov, KL-Cov) with LongAct masks: one function.

The step body is ``rl/step.py``; this file only strings the steps together with metrics,
progress and the save point shared with the SFT loop.
"""

from __future__ import annotations

from megatron_longact.config.schema import JobConfig
from megatron_longact.rl.heldout import HeldOutEval
from megatron_longact.rl.step import rl_step, setup_rl
from megatron_longact.runtime.metrics import MetricsWriter, Progress, tensorboard_dir
from megatron_longact.runtime.save_point import save_point
from megatron_longact.runtime.signals import StopRequest


def run_rl(job: JobConfig, *, config_yaml: str = "") -> dict[str, float]:
    """Trains ``train.train_steps`` RL steps from ``checkpoint.load_dir`` (the SFT model), or
    from the HF weights of ``model.hf_path``; resumes from ``checkpoint.save_dir``. Returns the
    last logged step's metrics. All ranks run it."""
    held_out = HeldOutEval.from_job(job)  # None unless rl.eval_interval > 0; checks its file
    run = setup_rl(job)
    state, last_step = run.state, job.train.train_steps
    writer = MetricsWriter(tensorboard_dir(job), wandb_project=job.logging.wandb_project)
    metrics: dict[str, float] = {}
    stop = StopRequest()
    start = state.progress["step"]
    with Progress(last_step, description="rl", enabled=job.logging.progress, start=start) as bar:
        if held_out is not None and start == 0:
            writer.log(held_out.evaluate(run), step=0)  # the start model: the curve's first point
        for step in range(start + 1, last_step + 1):
            step_metrics = rl_step(run, step=step)
            state.progress["step"] = step
            if step_metrics is not None:
                metrics = step_metrics
                writer.log(metrics, step=step)
                if writer.tb is not None:
                    run.longact.log_histograms(writer.tb, step=step)
            bar.update(info="no group kept" if step_metrics is None else
                       f"reward {metrics['rollout/reward_mean']:.3f} "
                       f"acc {metrics['rollout/accuracy']:.2f}")  # fmt: skip
            if held_out is not None and held_out.due(step, last_step=last_step):
                evaluated = held_out.evaluate(run)
                writer.log(evaluated, step=step)
                metrics = {**metrics, **evaluated}
            if save_point(state, job.checkpoint, stop, step=step, last_step=last_step,
                          config_yaml=config_yaml,
                          extra={"longact": run.longact.pipeline_state_dict()}):  # fmt: skip
                break
    writer.close()
    return metrics
