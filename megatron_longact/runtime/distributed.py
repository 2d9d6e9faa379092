"""Process groups: torch.distributed (nccl on GPU, gloo on CPU) and megatron parallel_state.

The one place that knows the parallel layout. Library code asks :func:`parallel_dims` instead
of reading environment variables.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_longact.config.schema import ParallelConfig
from megatron_longact.device import on_cuda
from megatron_longact.errors import UserError
from megatron_longact.runtime import cpu_compat


@dataclass(frozen=True, kw_only=True)
class ParallelDims:
    """Sizes and this rank's coordinates in the TP x CP x DP x PP grid."""

    world_size: int
    rank: int
    tp: int
    pp: int
    cp: int
    dp: int
    tp_rank: int
    pp_rank: int
    cp_rank: int
    dp_rank: int
    ep: int = 1
    """Expert parallel size (MoE); the experts' ranks are a sub-grid of DP x CP x TP."""
    ep_rank: int = 0
    etp: int = 1
    """Expert tensor parallel size (MoE; = tp unless parallel.expert_tensor_parallel_size)."""
    etp_rank: int = 0
    vpp: int = 1
    """Model chunks per pipeline rank (virtual pipeline stages; 1 = plain 1F1B)."""

    def is_first_chunk(self, vp_stage: int) -> bool:
        """Whether chunk ``vp_stage`` of this rank holds the embedding (first stage, chunk 0)."""
        return self.is_first_pipeline_stage and vp_stage == 0

    def is_last_chunk(self, vp_stage: int) -> bool:
        """Whether chunk ``vp_stage`` holds the output layer (last stage, last chunk)."""
        return self.is_last_pipeline_stage and vp_stage == self.vpp - 1

    @property
    def is_last_pipeline_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_first_pipeline_stage(self) -> bool:
        return self.pp_rank == 0


def check_world_size(world_size: int, parallel: ParallelConfig) -> int:
    """Returns the data-parallel size; raises UserError naming the fields when it is not whole."""
    model_parallel = (
        parallel.tensor_model_parallel_size
        * parallel.pipeline_model_parallel_size
        * parallel.context_parallel_size
    )
    if world_size % model_parallel != 0:
        raise UserError(
            f"world size {world_size} is not divisible by parallel.tensor_model_parallel_size "
            f"({parallel.tensor_model_parallel_size}) x parallel.pipeline_model_parallel_size "
            f"({parallel.pipeline_model_parallel_size}) x parallel.context_parallel_size "
            f"({parallel.context_parallel_size}) = {model_parallel}; change the layout or the "
            "number of processes"
        )
    ep = parallel.expert_model_parallel_size
    etp = parallel.expert_tensor_parallel_size or parallel.tensor_model_parallel_size
    expert_model_parallel = etp * ep * parallel.pipeline_model_parallel_size
    if ep * etp > 1 and world_size % expert_model_parallel:
        # megatron's expert grid is ETP x EP x expert-DP x PP (parallel_state.py ~788-795).
        raise UserError(
            f"world size {world_size} is not divisible by parallel.expert_tensor_parallel_size "
            f"({etp}) x parallel.expert_model_parallel_size ({ep}) x "
            f"parallel.pipeline_model_parallel_size ({parallel.pipeline_model_parallel_size}) = "
            f"{expert_model_parallel}; change the expert layout or the number of processes"
        )
    return world_size // model_parallel


def _router_gemm_without_te() -> None:
    """megatron-core 0.16.1 imports ``te_general_gemm`` only when Transformer Engine imports,
    but ``RouterGatingLinearFunction`` reads the name unconditionally
    (``transformer/moe/moe_utils.py`` ~22-39 and ~1192): without TE every MoE router forward
    raises NameError. Defining it as None selects the function's own torch matmul path. Here,
    before any model is built, as every process that builds one initialises through here."""
    from megatron.core.transformer.moe import moe_utils

    from megatron_longact.runtime.mcore_compat import replace_global

    if not hasattr(moe_utils, "te_general_gemm"):
        replace_global(moe_utils, "te_general_gemm", None)


def init_distributed(parallel: ParallelConfig, *, seed: int) -> ParallelDims:
    """Initialises torch.distributed, megatron's parallel state and the RNG trackers.

    Reads the launcher's RANK/WORLD_SIZE/MASTER_ADDR (torchrun or srun); a lone process with
    none of them becomes a world of one. All ranks must call it. On a machine without CUDA it
    enables :mod:`cpu_compat` and uses gloo. Collectives time out after
    ``parallel.collective_timeout_s``.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    on_gpu = on_cuda()
    cpu_compat.enable()
    _router_gemm_without_te()
    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # The timeout bounds every collective: a stalled (SIGSTOPped, hung) or dead rank ends
        # the job after it instead of holding every GPU for torch's 30-minute gloo default.
        # NCCL enforces it through TORCH_NCCL_ASYNC_ERROR_HANDLING (set by the Slurm scripts).
        dist.init_process_group(
            backend="nccl" if on_gpu else "gloo",
            timeout=datetime.timedelta(seconds=parallel.collective_timeout_s),
        )
    world_size = dist.get_world_size()
    dp = check_world_size(world_size, parallel)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
            # As Megatron-LM's initialize does: get_forward_backward_func then picks the
            # interleaved schedule (pipeline_parallel/schedules.py ~140-147, megatron-core 0.16.1).
            virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
            context_parallel_size=parallel.context_parallel_size,
            expert_model_parallel_size=parallel.expert_model_parallel_size,
            expert_tensor_parallel_size=parallel.expert_tensor_parallel_size,
            # megatron's groups take their own timeout (parallel_state.py ~561 and ~819,
            # megatron-core 0.16.1: timedelta(minutes=...), so a fraction of a minute works).
            distributed_timeout_minutes=parallel.collective_timeout_s / 60,
        )
    # Same data seed on every rank; megatron offsets the TP seed per TP rank itself.
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    return ParallelDims(
        world_size=world_size,
        rank=dist.get_rank(),
        tp=parallel.tensor_model_parallel_size,
        pp=parallel.pipeline_model_parallel_size,
        cp=parallel.context_parallel_size,
        dp=dp,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        cp_rank=parallel_state.get_context_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        ep=parallel_state.get_expert_model_parallel_world_size(),
        ep_rank=parallel_state.get_expert_model_parallel_rank(),
        etp=parallel_state.get_expert_tensor_parallel_world_size(),
        etp_rank=parallel_state.get_expert_tensor_parallel_rank(),
        vpp=parallel.num_model_chunks,
    )


def shutdown() -> None:
    """Tears down megatron's groups and the default group (safe to call twice)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    """A free TCP port on the loopback interface (for a local rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
