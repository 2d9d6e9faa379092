"""Periodic held-out evaluation inside the RL loop: a held-out curve beside the reward curve.

Every ``rl.eval_interval`` steps (and before the first and after the last) the policy answers
the held-out prompts of ``eval.synthetic_kv_path`` with the rollout engine itself: k =
``eval.num_samples`` responses per prompt at ``eval.sample_temperature`` and one greedy
response, scored with the training reward (``rl.reward``). Sampled accuracy is the lens that
shows RL's effect at small scale (mean@k rises while greedy accuracy does not: docs/study.md);
the greedy pass is kept for comparison with ``longact eval``'s default.

The sampling seed is the same at every evaluation (``eval.seed``), so consecutive points differ
by the weights and not by fresh randomness (common random numbers). The generation goes through
``rl.experience.generate_groups``: prompts split over DP x CP replicas, results gathered, every
rank returns the same metrics. Costs k + 1 generations per prompt: with 100 prompts and k = 8,
about 14 steps' worth of rollouts at 8 x 8 per step.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace

from megatron_longact.config.schema import JobConfig
from megatron_longact.data.rl_data import RLRecord, load_rl_jsonl
from megatron_longact.errors import UserError
from megatron_longact.rl.experience import Sample, generate_groups
from megatron_longact.rl.rollout.factory import replica_rank, sampling_params
from megatron_longact.stats import call_seed, mean_and_se, pass_at_k

PREFIX = "heldout/"


@dataclass(kw_only=True)
class HeldOutEval:
    """The held-out prompts and when to evaluate on them."""

    records: list[RLRecord]
    interval: int
    """Evaluate every this many RL steps (and at step 0 and the last step)."""
    at_start: bool = True
    """Also at step 0, the start model (``rl.eval_at_start``)."""

    @classmethod
    def from_job(cls, job: JobConfig) -> HeldOutEval | None:
        """None unless ``rl.eval_interval`` > 0; raises UserError naming the missing file."""
        rl, ev = job.rl, job.eval
        if rl.eval_interval == 0:
            return None
        if ev.synthetic_kv_path is None:
            raise UserError(
                "rl.eval_interval > 0 needs the held-out prompts: set eval.synthetic_kv_path "
                "(an RL JSONL, e.g. rl_val.jsonl of `longact data`)"
            )
        records = load_rl_jsonl(ev.synthetic_kv_path)[: rl.eval_num_prompts]
        if not records:
            raise UserError(f"eval.synthetic_kv_path={ev.synthetic_kv_path} holds no prompts")
        return cls(records=records, interval=rl.eval_interval, at_start=rl.eval_at_start)

    def evaluate(self, run) -> dict[str, float]:
        """``heldout/*`` metrics (fractions; ``_se`` the standard error over prompts) of the
        policy now. ``run`` is the ``rl.step.RLRun``. All ranks call it."""
        job = run.job
        tic = time.perf_counter()
        base = sampling_params(job, run.tokenizer, 0, step=0)
        seed = call_seed(job.eval.seed, replica_rank()[0])
        run.engine.wake()
        greedy = self._generate(run, num_samples=1, params=replace(base, temperature=0.0,
                                                                   seed=seed))  # fmt: skip
        k = job.eval.num_samples
        sampled = (
            self._generate(run, num_samples=k, params=replace(
                base, temperature=job.eval.sample_temperature, seed=seed))
            if k > 0 else None
        )  # fmt: skip
        run.engine.sleep()
        metrics = {
            f"{PREFIX}greedy_accuracy": statistics.fmean(g[0].answer_ok for g in greedy),
            f"{PREFIX}greedy_reward": statistics.fmean(g[0].reward for g in greedy),
        }
        if sampled is not None:
            metrics.update(sampled_metrics(sampled, num_samples=k))
        metrics[f"{PREFIX}eval_s"] = time.perf_counter() - tic
        return metrics

    def _generate(self, run, *, num_samples: int, params) -> list[list[Sample]]:
        rl = replace(run.job.rl, rollouts_per_prompt=num_samples)
        return generate_groups(run.engine, self.records, tokenizer=run.tokenizer, rl=rl,
                               params=params)  # fmt: skip


def sampled_metrics(groups: list[list[Sample]], *, num_samples: int) -> dict[str, float]:
    """mean@k accuracy, reward and format rate with their standard errors over prompts, and
    the unbiased pass@k (Chen et al. 2021), from k scored samples per prompt (fractions)."""
    metrics = {}
    for name, value in (("accuracy", lambda s: float(s.answer_ok)), ("reward", lambda s: s.reward),
                        ("format_rate", lambda s: float(s.format_ok))):  # fmt: skip
        mean, se = mean_and_se([statistics.fmean(value(s) for s in g) for g in groups])
        metrics[f"{PREFIX}{name}"], metrics[f"{PREFIX}{name}_se"] = mean, se
    mean, _ = mean_and_se(
        [pass_at_k(len(g), sum(s.answer_ok for s in g), num_samples) for g in groups]
    )
    metrics[f"{PREFIX}pass@{num_samples}"] = mean
    return metrics
