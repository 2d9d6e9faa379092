"""The RL loop (DAPO by default; GRPO, Clip-Cov, KL-Cov) with LongAct masks: one function."""

from __future__ import annotations

import logging
import time
from functools import partial

from megatron_longact.checkpoint import preflight, save_if_due
from megatron_longact.config.schema import JobConfig, check_rl_batch
from megatron_longact.data.tokenizer import TINY_TOKENIZER_DIR, load_tokenizer
from megatron_longact.longact.controller import LongActController
from megatron_longact.rl.batch import SEQ_MULTIPLE, make_rows, padded_length, split_rows
from megatron_longact.rl.data import load_rl_records
from megatron_longact.rl.experience import collect_experience
from megatron_longact.rl.forward import policy_forward_step
from megatron_longact.rl.logprobs import compute_logprobs
from megatron_longact.rl.losses import policy_loss
from megatron_longact.rl.metrics import experience_metrics
from megatron_longact.rl.reference import build_reference_model
from megatron_longact.rl.rollout.factory import build_engine, sampling_params
from megatron_longact.runtime.batches import global_batch_indices
from megatron_longact.runtime.distributed import init_distributed
from megatron_longact.runtime.metrics import MetricsWriter, Progress, tensorboard_dir
from megatron_longact.runtime.setup import load_start_weights, setup_train_state
from megatron_longact.runtime.signals import StopRequest
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


def run_rl(job: JobConfig, *, config_yaml: str = "") -> dict[str, float]:
    """Trains ``train.train_steps`` RL steps from ``checkpoint.load_dir`` (the SFT model);
    resumes from ``checkpoint.save_dir``. All ranks run it."""
    rl, ckpt = job.rl, job.checkpoint
    dims = init_distributed(job.parallel, seed=job.train.seed)
    check_rl_batch(job, dp=dims.dp)
    tokenizer = load_tokenizer(job.data.tokenizer_path or TINY_TOKENIZER_DIR)
    records = load_rl_records(rl, job.data)
    state = setup_train_state(job, dims)
    # The one LongAct hook: strategy none installs nothing (the plain dense run).
    longact = LongActController.from_train_state(job.longact, state)
    loaded = load_start_weights(job, state)
    state.progress.setdefault("prompts_consumed", 0)
    if loaded is not None and loaded.progress:
        state.progress.update(loaded.progress)
        longact.load_state_dict(loaded.extra.get("longact", {}))
    reference = build_reference_model(job, state) if rl.kl_beta > 0 else None
    engine = build_engine(job, state, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    mbs = job.data.micro_batch_size
    preflight(save_dir=ckpt.save_dir, other_dirs={"logging.tensorboard_dir": tensorboard_dir(job)},
              model=state.model, with_optimizer=True)  # fmt: skip
    writer = MetricsWriter(tensorboard_dir(job), wandb_project=job.logging.wandb_project)
    metrics: dict[str, float] = {}
    start = state.progress["step"]
    stop = StopRequest()

    def next_records(n: int):
        order = global_batch_indices(
            len(records), batch_size=n, seed=rl.seed, consumed=state.progress["prompts_consumed"]
        )
        state.progress["prompts_consumed"] += n
        return [records[i] for i in order]

    with Progress(
        job.train.train_steps, description="rl", enabled=job.logging.progress, start=start
    ) as bar:
        for step in range(start + 1, job.train.train_steps + 1):
            tic = time.perf_counter()
            engine.wake()
            exp = collect_experience(
                engine,
                next_records,
                tokenizer=tokenizer,
                rl=rl,
                params_for_round=partial(sampling_params, job, tokenizer, step=step),
            )
            engine.sleep()
            generate_s = time.perf_counter() - tic
            samples = [s for g in exp.groups for s in g]
            if not samples:  # only under rl.on_exhausted=continue: nothing to train on
                logger.warning("step %d: dynamic sampling kept no group; no update", step)
                state.progress["step"] = step
                stopping = stop.agreed(step=step)
                save_if_due(state, ckpt, step=step, last_step=job.train.train_steps,
                            stopping=stopping, config_yaml=config_yaml,
                            extra={"longact": longact.pipeline_state_dict()})  # fmt: skip
                if stopping:
                    break
                continue
            # This DP rank's contiguous share of the global batch, in micro-batches.
            share = len(samples) // dims.dp
            mine = samples[dims.dp_rank * share : (dims.dp_rank + 1) * share]
            rows = make_rows(
                mine,
                length=padded_length(samples, multiple=SEQ_MULTIPLE * dims.cp),
                pad_token_id=pad,
                overlong_filter=rl.overlong_filter,
            )
            micro = split_rows(rows, mbs)
            for batch, logp in zip(
                micro, compute_logprobs(state.model, micro, temperature=rl.temperature)
            ):
                if logp is not None:
                    batch["old_logp"] = logp
            if reference is not None:
                for batch, logp in zip(
                    micro, compute_logprobs([reference], micro, temperature=rl.temperature)
                ):
                    if logp is not None:
                        batch["ref_logp"] = logp
            logprob_s = time.perf_counter() - tic - generate_s
            forward = policy_forward_step(
                policy_loss(rl, step=step), temperature=rl.temperature, per_sequence=rl.algorithm == "grpo"
            )
            per_update = len(micro) // rl.num_minibatches
            for k in range(rl.num_minibatches):
                chunk = micro[k * per_update : (k + 1) * per_update]
                result = train_step(
                    state,
                    forward_step_func=forward,
                    data_iterator=longact.observe(iter(chunk)),
                    num_microbatches=len(chunk),
                    seq_length=rows["tokens"].shape[1],
                    micro_batch_size=mbs,
                    report_keys=POLICY_REPORTS,
                )
            state.progress["step"] = step
            elapsed = time.perf_counter() - tic
            metrics = {
                **experience_metrics(exp, micro, rl=rl),
                "train/loss": result.loss,
                "train/grad_norm": result.grad_norm,
                "train/lr": result.lr,
                **{f"train/{k}": v for k, v in result.extras.items()},
                **longact.metrics(),
                "perf/tokens_per_s": sum(len(s.prompt_ids) + len(s.response_ids) for s in samples)
                / elapsed,
                "perf/step_s": elapsed,
                "perf/generate_s": generate_s,
                "perf/logprob_s": logprob_s,
                "perf/train_s": elapsed - generate_s - logprob_s,
            }
            writer.log(metrics, step=step)
            if writer.tb is not None:
                longact.log_histograms(writer.tb, step=step)
            bar.update(
                info=f"reward {metrics['rollout/reward_mean']:.3f} "
                f"acc {metrics['rollout/accuracy']:.2f}"
            )
            stopping = stop.agreed(step=step)
            save_if_due(
                state,
                ckpt,
                step=step,
                last_step=job.train.train_steps,
                stopping=stopping,
                config_yaml=config_yaml,
                extra={"longact": longact.pipeline_state_dict()},
            )
            if stopping:
                logger.warning("stopped after step %d on request; resume by re-running", step)
                break
    writer.close()
    return metrics
