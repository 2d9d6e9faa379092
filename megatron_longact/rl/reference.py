"""The frozen reference policy for a KL penalty (built only when ``rl.kl_beta > 0``)."""

from __future__ import annotations

from megatron_longact.checkpoint import load_checkpoint
from megatron_longact.config.schema import JobConfig
from megatron_longact.models.gpt import build_gpt_model
from megatron_longact.runtime.setup import TrainState


def build_reference_model(job: JobConfig, state: TrainState):
    """A GPTModel chunk with the starting weights (``checkpoint.load_dir``), no grads.

    Same layout as the policy; no DDP or optimizer, so it costs weights only. All ranks must
    call it (the checkpoint load is collective).
    """
    if job.checkpoint.load_dir is None:
        raise ValueError("rl.kl_beta > 0 needs checkpoint.load_dir (the reference weights)")
    dims = state.dims
    model = build_gpt_model(state.arch, state.transformer_config, model=job.model,
                            pre_process=dims.is_first_pipeline_stage,
                            post_process=dims.is_last_pipeline_stage)  # fmt: skip
    load_checkpoint(job.checkpoint.load_dir, model=[model], weights_only=True)
    model.requires_grad_(False)
    model.eval()
    return model
