"""Model, DDP, distributed optimizer and LR scheduler for a run, built in one place.

The order matters and is megatron's: build the GPTModel chunk for this pipeline stage, wrap it
in ``Float16Module`` for bf16, wrap that in megatron DDP (which allocates the contiguous
param/grad buffers that ``param.main_grad`` views into), then build the (distributed)
optimizer over those buffers and the scheduler over the optimizer.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from megatron_longact.config.schema import JobConfig
from megatron_longact.errors import UserError
from megatron_longact.models.gpt import (
    build_gpt_model,
    load_architecture,
    make_transformer_config,
    unwrap_gpt,
)
from megatron_longact.models.hf_config import HFArchitecture
from megatron_longact.runtime.distributed import ParallelDims

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class TrainProgress:
    """The counters a run advances, saves in every checkpoint (as a plain dict, see
    :meth:`state_dict`) and resumes from."""

    step: int = 0
    """Optimizer steps done (1-based step ``step`` is the last one finished)."""
    consumed_samples: int = 0
    """SFT: packed samples taken from the training set (the data order resumes from it)."""
    prompts_consumed: int = 0
    """RL: prompt records drawn from the seeded epoch order (the next step's prompts)."""

    def state_dict(self) -> dict[str, int]:
        """The checkpoint's ``progress`` entry: ``{field: value}``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_state_dict(cls, saved: dict) -> TrainProgress:
        """From a checkpoint's ``progress`` dict; a counter an older checkpoint lacks is 0
        (SFT checkpoints saved before RL existed hold no ``prompts_consumed``)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: int(v) for k, v in saved.items() if k in names})


@dataclass(kw_only=True)
class TrainState:
    """What a loop needs to run steps; the mutable counters live in ``progress``."""

    arch: HFArchitecture
    transformer_config: Any  # megatron TransformerConfig
    model: list
    """This rank's DDP-wrapped GPTModel chunks, one per virtual pipeline stage (one without
    virtual stages), in ``vp_stage`` order; megatron's schedules take the list."""
    optimizer: Any  # megatron MegatronOptimizer (DistributedOptimizer when configured)
    scheduler: Any  # megatron OptimizerParamScheduler
    dims: ParallelDims
    progress: TrainProgress = dataclasses.field(default_factory=TrainProgress)


def setup_train_state(job: JobConfig, dims: ParallelDims) -> TrainState:
    """Builds the model chunk, DDP, optimizer and scheduler. All ranks must call it."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.transformer.module import Float16Module

    arch = load_architecture(job.model)
    if arch.vocab_size % dims.tp:
        raise UserError(
            f"vocab_size={arch.vocab_size} is not divisible by tensor parallel size {dims.tp}"
        )
    tconfig = make_transformer_config(arch, model=job.model, parallel=job.parallel, train=job.train)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=job.parallel.overlap_grad_reduce,
        overlap_param_gather=job.parallel.overlap_param_gather,
        use_distributed_optimizer=job.parallel.use_distributed_optimizer,
    )
    chunks = []
    for vp_stage, gpt in enumerate(build_model_chunks(arch, tconfig, job=job, dims=dims)):
        if tconfig.bf16:
            gpt = Float16Module(tconfig, gpt)
        # Each chunk gets its own DDP and grad buffer; chunks after the first reduce as one
        # bucket, as Megatron-LM does ("communication for these model chunks is overlapped
        # with compute anyway": megatron/training/training.py ~2504-2511 at d98e8a6).
        chunks.append(DistributedDataParallel(tconfig, ddp_config, gpt,
                                              disable_bucketing=vp_stage > 0))  # fmt: skip
    # Hook point for gradient post-processing (LongAct masks wrap this, see longact/).
    tconfig.finalize_model_grads_func = finalize_model_grads
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=job.optim.lr,
        min_lr=job.optim.min_lr,
        weight_decay=job.optim.weight_decay,
        adam_beta1=job.optim.adam_beta1,
        adam_beta2=job.optim.adam_beta2,
        adam_eps=job.optim.adam_eps,
        clip_grad=job.optim.clip_grad,
        bf16=tconfig.bf16,
        params_dtype=tconfig.params_dtype,
        use_distributed_optimizer=job.parallel.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, chunks)  # one optimizer over all chunks
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=job.optim.lr,
        min_lr=job.optim.min_lr,
        lr_warmup_steps=job.lr_warmup_steps,
        lr_decay_steps=max(job.train.train_steps, 1),
        lr_decay_style=job.optim.lr_decay_style,
        start_wd=job.optim.weight_decay,
        end_wd=job.optim.weight_decay,
        wd_incr_steps=max(job.train.train_steps, 1),
        wd_incr_style="constant",
    )
    return TrainState(
        arch=arch,
        transformer_config=tconfig,
        model=chunks,
        optimizer=optimizer,
        scheduler=scheduler,
        dims=dims,
    )


def build_model_chunks(
    arch: HFArchitecture, tconfig, *, job: JobConfig, dims: ParallelDims
) -> list:
    """This rank's bare GPTModel chunks, one per virtual pipeline stage: chunk ``v`` holds the
    embedding only on the first stage's chunk 0 and the output layer only on the last stage's
    last chunk (Megatron-LM's ``get_model``, megatron/training/training.py ~2382-2405 at
    d98e8a6). Without virtual stages, one chunk with ``vp_stage`` None. All ranks call it."""
    if dims.vpp == 1:
        return [build_gpt_model(arch, tconfig, model=job.model,
                                pre_process=dims.is_first_pipeline_stage,
                                post_process=dims.is_last_pipeline_stage)]  # fmt: skip
    return [
        build_gpt_model(
            arch,
            tconfig,
            model=job.model,
            vp_stage=v,
            pre_process=dims.is_first_chunk(v),
            post_process=dims.is_last_chunk(v),
        )  # fmt: skip
        for v in range(dims.vpp)
    ]


def init_source(job: JobConfig) -> str:
    """``hf`` or ``random``: where a run that neither resumes nor loads takes its weights."""
    if job.model.init == "auto":
        return "hf" if job.model.hf_path is not None else "random"
    if job.model.init == "hf" and job.model.hf_path is None:
        raise UserError(
            "model.init=hf needs model.hf_path (a local Hugging Face folder with safetensors); "
            "set it, or model.init=random"
        )
    return job.model.init


def load_start_weights(job: JobConfig, state: TrainState):
    """The start-of-run policy, in order: resume ``checkpoint.save_dir``'s latest (everything),
    else load ``checkpoint.load_dir`` (weights only when ``checkpoint.load_weights_only``),
    else the Hugging Face weights of ``model.hf_path`` (see :func:`init_source`), else keep
    the random init. Logs which one happened. Returns the
    :class:`~megatron_longact.checkpoint.LoadedCheckpoint` or None (HF or random start).

    Whenever the optimizer state is not restored, the optimizer's fp32 master copies are
    refreshed from the loaded weights (``checkpoint.load_checkpoint`` does it for checkpoints,
    this function for HF weights): the distributed optimizer copied the construction-time
    weights into them (megatron/core/optimizer/distrib_optimizer.py ~399), and the first step
    would write those back. All ranks must call it (checkpoint loads are collective).
    """
    from megatron_longact.checkpoint import resume_or_load

    ckpt = job.checkpoint
    log = logger.info if state.dims.rank == 0 else (lambda *_: None)
    loaded = resume_or_load(
        save_dir=ckpt.save_dir,
        load_dir=ckpt.load_dir,
        load_weights_only=ckpt.load_weights_only,
        model=state.model,
        optimizer=state.optimizer,
        scheduler=state.scheduler,
        on_corrupt=ckpt.on_corrupt,
    )
    if loaded is not None:
        if loaded.progress:  # a resume: the counters carry on (a weights-only load starts at 0)
            state.progress = TrainProgress.from_state_dict(loaded.progress)
        what = "resumed" if loaded.optimizer_restored or loaded.progress else "loaded weights of"
        log("init: %s checkpoint %s (step %d)", what, loaded.path, loaded.step)
        return loaded
    if init_source(job) == "random":
        log(
            "init: random weights (init_method_std=%g; model.init=%s, %s)",
            job.model.init_method_std,
            job.model.init,
            f"hf_path {job.model.hf_path}" if job.model.hf_path else f"preset {job.model.preset}",
        )
        return None
    from megatron_longact.models.hf_weights.hf_to_mcore import load_hf_weights

    for chunk in state.model:  # HF layer i goes to the chunk whose layer_number is i + 1
        source = load_hf_weights(
            unwrap_gpt(chunk),
            job.model.hf_path,
            arch=state.arch,
            tp_rank=state.dims.tp_rank,
            tp=state.dims.tp,
            show_progress=job.logging.progress and state.dims.rank == 0,
        )
    state.optimizer.reload_model_params()
    log(
        "init: Hugging Face weights from %s (%s, stored %s, trained in %s)",
        source.model_dir,
        source.arch.model_type,
        str(source.weights_dtype).removeprefix("torch."),
        str(state.transformer_config.params_dtype).removeprefix("torch."),
    )
    return None


def build_frozen_model(
    job: JobConfig, *, arch: HFArchitecture, transformer_config, dims: ParallelDims, load_dir: str
):
    """A bare GPTModel chunk for this pipeline stage with the weights of ``load_dir``, no
    grads, in eval mode (reference policy, evaluation). No DDP or optimizer: weights only.
    All ranks must call it (the checkpoint load is collective)."""
    from megatron_longact.checkpoint import load_checkpoint

    model = build_gpt_model(arch, transformer_config, model=job.model,
                            pre_process=dims.is_first_pipeline_stage,
                            post_process=dims.is_last_pipeline_stage)  # fmt: skip
    load_checkpoint(load_dir, model=[model], weights_only=True)
    model.requires_grad_(False)
    return model.eval()
