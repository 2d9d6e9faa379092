"""One RL step: generate and score rollouts, old/reference log-probs, the policy update.

:func:`setup_rl` builds what every step uses (an :class:`RLRun`); :func:`rl_step` is the step
itself; ``rl/loop.py`` strings them together with logging and checkpoints.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

from megatron_longact.checkpoint import preflight
from megatron_longact.config.schema import JobConfig, check_rl_batch
from megatron_longact.data.tokenizer import TINY_TOKENIZER_DIR, load_tokenizer, pad_id
from megatron_longact.longact.controller import LongActController
from megatron_longact.rl.batch import SEQ_MULTIPLE, make_rows, padded_length, split_rows
from megatron_longact.rl.correction import apply_rollout_correction
from megatron_longact.rl.data import load_rl_records
from megatron_longact.rl.experience import collect_experience
from megatron_longact.rl.forward import policy_forward_step
from megatron_longact.rl.logprobs import compute_logprobs
from megatron_longact.rl.losses import policy_loss
from megatron_longact.rl.metrics import experience_metrics
from megatron_longact.rl.reference import build_reference_model
from megatron_longact.rl.rollout.factory import build_engine, sampling_params
from megatron_longact.rl.rollout.stops import resolve_stop_conditions
from megatron_longact.rl.rollout.types import RolloutEngine
from megatron_longact.runtime.batches import global_batch_indices
from megatron_longact.runtime.distributed import init_distributed
from megatron_longact.runtime.metrics import tensorboard_dir
from megatron_longact.runtime.setup import TrainState, load_start_weights, setup_train_state
from megatron_longact.runtime.train_step import train_step

logger = logging.getLogger(__name__)

# Loss-function metrics to reduce and log (a key a loss does not report logs as 0).
POLICY_REPORTS = (
    "entropy",
    "clip_frac_low",
    "clip_frac_high",
    "dual_clip_frac",
    "approx_kl",
    "ratio_mean",
    "kl",
    "clip_cov_frac",
    "kl_abs_mean",
    "kl_cov_frac",
)


@dataclass(kw_only=True)
class RLRun:
    """What an RL run sets up once and every step uses."""

    job: JobConfig
    state: TrainState
    longact: LongActController
    """The one LongAct hook (strategy none installs nothing: the plain dense run)."""
    engine: RolloutEngine
    tokenizer: Any
    reference: Any | None
    """Frozen reference model for the KL term (``rl.kl_beta`` > 0), else None."""
    records: list
    """The RL prompt records; their order per step comes from ``progress['prompts_consumed']``."""


def setup_rl(job: JobConfig) -> RLRun:
    """Distributed init, data, model, LongAct, start weights (resume / load / HF), reference
    model, rollout engine and the preflight of the output folders. All ranks call it."""
    rl, ckpt = job.rl, job.checkpoint
    dims = init_distributed(job.parallel, seed=job.train.seed)
    check_rl_batch(job, dp=dims.dp)
    tokenizer = load_tokenizer(job.data.tokenizer_path or TINY_TOKENIZER_DIR)
    resolve_stop_conditions(tokenizer, job.rl.stop_strings)  # a bad stop string fails here
    records = load_rl_records(rl, job.data)
    state = setup_train_state(job, dims)
    longact = LongActController.from_train_state(job.longact, state)
    loaded = load_start_weights(job, state)
    state.progress.setdefault("prompts_consumed", 0)
    if loaded is not None and loaded.progress:
        state.progress.update(loaded.progress)
        longact.load_state_dict(loaded.extra.get("longact", {}))
    reference = build_reference_model(job, state) if rl.kl_beta > 0 else None
    engine = build_engine(job, state, tokenizer)
    preflight(save_dir=ckpt.save_dir, other_dirs={"logging.tensorboard_dir": tensorboard_dir(job)},
              model=state.model, with_optimizer=True)  # fmt: skip
    return RLRun(job=job, state=state, longact=longact, engine=engine, tokenizer=tokenizer,
                 reference=reference, records=records)  # fmt: skip


def _next_records(run: RLRun, n: int) -> list:
    """The next ``n`` prompt records of the seeded epoch order (the same on every rank)."""
    progress = run.state.progress
    order = global_batch_indices(len(run.records), batch_size=n, seed=run.job.rl.seed,
                                 consumed=progress["prompts_consumed"])  # fmt: skip
    progress["prompts_consumed"] += n
    return [run.records[i] for i in order]


def _micro_batches(run: RLRun, samples: list) -> list[dict]:
    """This DP rank's contiguous share of the step's samples as micro-batches of
    ``data.micro_batch_size`` rows [b, L] (L padded to a multiple of SEQ_MULTIPLE x CP), with
    ``old_logp`` (and ``ref_logp``) [b, L] from the current (and reference) model."""
    rl, dims = run.job.rl, run.state.dims
    pad = pad_id(run.tokenizer)
    share = len(samples) // dims.dp
    mine = samples[dims.dp_rank * share : (dims.dp_rank + 1) * share]
    rows = make_rows(mine, length=padded_length(samples, multiple=SEQ_MULTIPLE * dims.cp),
                     pad_token_id=pad, overlong_filter=rl.overlong_filter)  # fmt: skip
    micro = split_rows(rows, run.job.data.micro_batch_size)
    models = {"old_logp": run.state.model, "ref_logp": [run.reference] if run.reference else None}
    for key, model in models.items():
        if model is None:
            continue
        for batch, logp in zip(micro, compute_logprobs(model, micro, temperature=rl.temperature)):
            if logp is not None:
                batch[key] = logp
    return micro


def rl_step(run: RLRun, *, step: int) -> dict[str, float] | None:
    """RL step ``step`` (1-based): rollouts, log-probs, ``rl.num_minibatches`` optimizer
    updates. Returns the step's metrics, or None when dynamic sampling kept no group (only
    under ``rl.on_exhausted=continue``; no update then). All ranks call it."""
    job, rl, state = run.job, run.job.rl, run.state
    tic = time.perf_counter()
    run.engine.wake()
    exp = collect_experience(run.engine, partial(_next_records, run), tokenizer=run.tokenizer,
                             rl=rl, params_for_round=partial(sampling_params, job, run.tokenizer,
                                                             step=step))  # fmt: skip
    run.engine.sleep()
    generate_s = time.perf_counter() - tic
    samples = [s for g in exp.groups for s in g]
    if not samples:
        logger.warning("step %d: dynamic sampling kept no group; no update", step)
        return None
    micro = _micro_batches(run, samples)
    correction = apply_rollout_correction(micro, rl=rl)
    logprob_s = time.perf_counter() - tic - generate_s
    forward = policy_forward_step(policy_loss(rl, step=step), temperature=rl.temperature,
                                  per_sequence=rl.algorithm == "grpo")  # fmt: skip
    per_update = len(micro) // rl.num_minibatches
    for k in range(rl.num_minibatches):
        chunk = micro[k * per_update : (k + 1) * per_update]
        result = train_step(state, forward_step_func=forward,
                            data_iterator=run.longact.observe(iter(chunk)),
                            num_microbatches=len(chunk), seq_length=micro[0]["tokens"].shape[1],
                            micro_batch_size=job.data.micro_batch_size,
                            report_keys=POLICY_REPORTS)  # fmt: skip
    elapsed = time.perf_counter() - tic
    tokens = sum(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    return {
        **experience_metrics(exp, micro, rl=rl),
        "train/loss": result.loss,
        "train/grad_norm": result.grad_norm,
        "train/lr": result.lr,
        **{f"train/{k}": v for k, v in result.extras.items()},
        **run.longact.metrics(),
        **correction,
        **(run.engine.metrics() if hasattr(run.engine, "metrics") else {}),
        "perf/tokens_per_s": tokens / elapsed,
        "perf/step_s": elapsed,
        "perf/generate_s": generate_s,
        "perf/logprob_s": logprob_s,
        "perf/train_s": elapsed - generate_s - logprob_s,
    }
