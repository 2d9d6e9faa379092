"""The frozen reference policy for a KL penalty (built only when ``rl.kl_beta > 0``)."""

from __future__ import annotations

from megatron_longact.config.schema import JobConfig
from megatron_longact.errors import UserError
from megatron_longact.runtime.setup import TrainState, build_frozen_model


def build_reference_model(job: JobConfig, state: TrainState):
    """A GPTModel chunk with the starting weights (``checkpoint.load_dir``), no grads.

    Same layout as the policy; no DDP or optimizer, so it costs weights only. All ranks must
    call it (the checkpoint load is collective).
    """
    if job.checkpoint.load_dir is None:
        raise UserError("rl.kl_beta > 0 needs checkpoint.load_dir (the reference weights)")
    return build_frozen_model(job, arch=state.arch, transformer_config=state.transformer_config,
                              dims=state.dims, load_dir=job.checkpoint.load_dir)  # fmt: skip
