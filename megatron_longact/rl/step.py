"""One RL step: generate and score rollouts, old/reference log-probs, the policy update.

:func:`setup_rl` builds what every step uses (an :class:`RLRun`); :func:`rl_step` is the step
itself; ``rl/loop.py`` hands it to the loop skeleton (``runtime.loop``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

from megatron_longact.config.schema import JobConfig, check_rl_batch
from megatron_longact.data.tokenizer import TINY_TOKENIZER_DIR, load_tokenizer, pad_id
from megatron_longact.longact.controller import LongActController
from megatron_longact.rl.batch import (
    RowLayout,
    StepPlan,
    build_micro_batches,
    padded_length,
    plan_step,
    row_layout,
    sample_length,
)
from megatron_longact.rl.correction import apply_rollout_correction
from megatron_longact.rl.data import load_rl_records
from megatron_longact.rl.experience import collect_experience
from megatron_longact.rl.forward import policy_forward_step
from megatron_longact.rl.logprobs import compute_logprobs
from megatron_longact.rl.losses import policy_loss
from megatron_longact.rl.metrics import experience_metrics, layout_metrics, mean_results
from megatron_longact.rl.reference import build_reference_model
from megatron_longact.rl.rollout.factory import build_engine, sampling_params
from megatron_longact.rl.rollout.stops import resolve_stop_conditions
from megatron_longact.rl.rollout.types import RolloutEngine
from megatron_longact.runtime.batches import global_batch_indices
from megatron_longact.runtime.distributed import init_distributed
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
    """The RL prompt records; their order per step comes from ``progress.prompts_consumed``."""


def setup_rl(job: JobConfig) -> RLRun:
    """Distributed init, data, model, LongAct, start weights (resume / load / HF), reference
    model and rollout engine. All ranks call it."""
    rl = job.rl
    dims = init_distributed(job.parallel, seed=job.train.seed)
    check_rl_batch(job, dp=dims.dp)
    tokenizer = load_tokenizer(job.data.tokenizer_path or TINY_TOKENIZER_DIR)
    resolve_stop_conditions(tokenizer, job.rl.stop_strings)  # a bad stop string fails here
    records = load_rl_records(rl, job.data)
    state = setup_train_state(job, dims)
    longact = LongActController.from_train_state(job.longact, state)
    loaded = load_start_weights(job, state)
    if loaded is not None and loaded.progress:
        longact.load_state_dict(loaded.extra.get("longact", {}))
    reference = build_reference_model(job, state) if rl.kl_beta > 0 else None
    engine = build_engine(job, state, tokenizer)
    return RLRun(job=job, state=state, longact=longact, engine=engine, tokenizer=tokenizer,
                 reference=reference, records=records)  # fmt: skip


def _next_records(run: RLRun, n: int) -> list:
    """The next ``n`` prompt records of the seeded epoch order (the same on every rank)."""
    progress = run.state.progress
    order = global_batch_indices(len(run.records), batch_size=n, seed=run.job.rl.seed,
                                 consumed=progress.prompts_consumed)  # fmt: skip
    progress.prompts_consumed += n
    return [run.records[i] for i in order]


def step_layout(job: JobConfig, dims) -> RowLayout:
    """The micro-batch layout of an RL step at this parallel layout (``rl.packing``). Packed
    rows go to attention as THD: Transformer Engine's, the local CP attention and, at CP=1,
    megatron's local kernel per segment (``models.cp_attention``) all take it, and none needs
    the [T, T] block-causal mask."""
    return row_layout(packed=job.rl.packing, thd=True, cp=dims.cp, tp=dims.tp,
                      sequence_parallel=job.parallel.sequence_parallel)  # fmt: skip


def step_micro_batches(
    job: JobConfig,
    state: TrainState,
    samples: list,
    *,
    pad_token_id: int,
    reference: Any | None = None,
    layout: RowLayout | None = None,
) -> tuple[list[list[dict]], StepPlan]:
    """This DP rank's micro-batches of the step, per optimizer update, and the step's plan.

    Which samples go together is :func:`rl.batch.plan_step` (all samples, balanced over DP,
    the same at every TP/CP/PP layout); their layout :func:`step_layout` (packed THD rows, or
    padded rows) unless ``layout`` is given. Each micro-batch gets ``old_logp`` (and
    ``ref_logp`` from ``reference``) shaped like its ``tokens``. All ranks call it.
    """
    rl, dims = job.rl, state.dims
    plan = plan_step([sample_length(s) for s in samples], dp=dims.dp,
                     num_minibatches=rl.num_minibatches,
                     micro_batch_size=job.data.micro_batch_size,
                     max_tokens_per_microbatch=rl.max_tokens_per_microbatch,
                     balance=rl.dp_balance)  # fmt: skip
    if plan.num_oversize:
        logger.warning("%d sequence(s) exceed rl.max_tokens_per_microbatch=%d; each runs in a "
                       "micro-batch of its own", plan.num_oversize,
                       rl.max_tokens_per_microbatch)  # fmt: skip
    layout = layout or step_layout(job, dims)
    mine = plan.mine(dims.dp_rank)
    micro = build_micro_batches(samples, [g for update in mine for g in update], layout=layout,
                                pad_token_id=pad_token_id, overlong_filter=rl.overlong_filter,
                                padded_to=padded_length(samples, multiple=layout.row_multiple),
                                same_length=dims.pp > 1)  # fmt: skip
    for key, model in {"old_logp": state.model,
                       "ref_logp": [reference] if reference else None}.items():  # fmt: skip
        if model is None:
            continue
        logps = compute_logprobs(model, micro, temperature=rl.temperature,
                                 chunk_tokens=rl.logprob_chunk_tokens)  # fmt: skip
        for batch, logp in zip(micro, logps):
            if logp is not None:
                batch[key] = logp
    updates, start = [], 0
    for update in mine:
        updates.append(micro[start : start + len(update)])
        start += len(update)
    return updates, plan


def policy_updates(
    job: JobConfig,
    state: TrainState,
    updates: list[list[dict]],
    *,
    step: int,
    observe: Callable[[Iterator], Iterator] = lambda it: it,
):
    """One optimizer update per entry of ``updates`` (this rank's micro-batches); returns
    their ``StepResult`` averaged (``rl.metrics.mean_results``). ``observe`` wraps each
    update's data iterator (LongAct's meter). All ranks call it."""
    rl = job.rl
    forward = policy_forward_step(policy_loss(rl, step=step), temperature=rl.temperature,
                                  per_sequence=rl.algorithm == "grpo",
                                  chunk_tokens=rl.logprob_chunk_tokens)  # fmt: skip
    results = []
    for chunk in updates:
        # Rows of one update share a shape under pipeline parallel (p2p shapes, rl.batch);
        # without it megatron's schedule reads neither value.
        results.append(train_step(state, forward_step_func=forward,
                                  data_iterator=observe(iter(chunk)),
                                  num_microbatches=len(chunk),
                                  seq_length=max(b["tokens"].shape[1] for b in chunk),
                                  micro_batch_size=max(b["tokens"].shape[0] for b in chunk),
                                  report_keys=POLICY_REPORTS))  # fmt: skip
    return mean_results(results)


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
    updates, plan = step_micro_batches(job, state, samples, pad_token_id=pad_id(run.tokenizer),
                                       reference=run.reference)  # fmt: skip
    micro = [batch for update in updates for batch in update]
    correction = apply_rollout_correction(micro, rl=rl)
    logprob_s = time.perf_counter() - tic - generate_s
    result = policy_updates(job, state, updates, step=step, observe=run.longact.observe)
    elapsed = time.perf_counter() - tic
    tokens = sum(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    return {
        **experience_metrics(exp, micro, rl=rl),
        **layout_metrics(micro, plan=plan),
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
