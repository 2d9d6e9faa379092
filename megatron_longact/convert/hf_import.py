"""Import a Hugging Face Qwen3/Qwen3-MoE/Qwen2/Llama folder into our checkpoint at any TP/PP/EP.

Every rank builds its own GPTModel chunk (no optimizer, no random init), streams its slices in
(:func:`~megatron_longact.models.hf_weights.hf_to_mcore.load_hf_into_chunk`), and all ranks
save together with :func:`save_checkpoint` (weights only, step 0, atomic). A run starts from
the result with ``checkpoint.load_dir=<out> checkpoint.load_weights_only=true``.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Literal

import torch

from megatron_longact.errors import UserError
from megatron_longact.models.hf_weights.hf_files import HFWeights, has_tokenizer
from megatron_longact.models.hf_weights.hf_to_mcore import (
    HFSource,
    inspect_hf_dir,
    load_hf_into_chunk,
)
from megatron_longact.models.hf_weights.mapping import padded_vocab_size
from megatron_longact.models.hf_weights.progress import progress_bar

ImportDtype = Literal["auto", "fp32", "bf16"]


def resolve_precision(dtype: ImportDtype, *, weights_dtype: torch.dtype) -> str:
    """``train.precision`` to build with: ``auto`` keeps fp32 and bf16 weights as they are and
    widens fp16 to fp32 (bf16 would lose mantissa bits)."""
    if dtype != "auto":
        return dtype
    return "bf16" if weights_dtype == torch.bfloat16 else "fp32"


def check_out_dir(out_dir: str | Path) -> None:
    """Refuses to write into a non-empty folder (an older checkpoint there would mix in)."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} exists and is not empty; remove it or pick another")


def import_world_size(*, tp: int, pp: int, ep: int = 1, etp: int | None = None) -> int:
    """Smallest world that holds both grids: TP x PP for the dense part and
    expert-TP x EP x PP for the experts (megatron carves EP out of data parallel)."""
    return math.lcm(tp, (etp or tp) * ep) * pp


def import_job_config(
    source: HFSource, *, tp: int, pp: int, precision: str, ep: int = 1, etp: int | None = None
):
    """The JobConfig written as the checkpoint's ``config.yaml`` (export reads it back)."""
    from megatron_longact.config.schema import (
        DataConfig,
        JobConfig,
        ModelConfig,
        ParallelConfig,
        TrainConfig,
    )

    model_dir = str(source.model_dir.resolve())
    return JobConfig(
        model=ModelConfig(hf_path=model_dir),
        parallel=ParallelConfig(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            expert_model_parallel_size=ep,
            expert_tensor_parallel_size=etp,
        ),
        train=TrainConfig(precision=precision),
        data=DataConfig(tokenizer_path=model_dir if has_tokenizer(source.model_dir) else None),
    )


def import_hf_checkpoint(
    *,
    hf_dir: str | Path,
    out_dir: str | Path,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    etp: int | None = None,
    dtype: ImportDtype = "auto",
    show_progress: bool = True,
) -> Path:
    """Converts the HF folder ``hf_dir`` into a megatron checkpoint under ``out_dir``.

    All ranks of a world of :func:`import_world_size` processes (x any DP) must call it
    (``ep``/``etp``: expert parallel and expert-tensor parallel sizes of MoE models; the saved
    checkpoint loads at any other layout, dist_checkpointing reshards). It initialises
    torch.distributed and megatron's parallel state if needed (collective), builds this rank's
    chunk in fp32 or bf16 (see :func:`resolve_precision`), loads its slices and saves. The
    vocabulary is padded with zero rows to a multiple of ``tp`` when needed. Returns the
    checkpoint directory (``out_dir/iter_0000000``, with ``latest`` pointing at it).

    Raises:
        FileExistsError: ``out_dir`` is not empty.
        UserError: the world's TP/PP/EP differ from ``tp``/``pp``/``ep``; see
            :func:`inspect_hf_dir`.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_longact.checkpoint.dist_ckpt import save_checkpoint
    from megatron_longact.config.loader import to_yaml
    from megatron_longact.models.gpt import build_gpt_model, make_transformer_config
    from megatron_longact.runtime.distributed import init_distributed

    source = inspect_hf_dir(hf_dir)
    check_out_dir(out_dir)
    precision = resolve_precision(dtype, weights_dtype=source.weights_dtype)
    job = import_job_config(source, tp=tp, pp=pp, precision=precision, ep=ep, etp=etp)
    dims = init_distributed(job.parallel, seed=job.train.seed)
    world_layout = (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_expert_model_parallel_world_size(),
    )
    if world_layout != (tp, pp, ep):
        raise UserError(
            f"this world is already set up at TP={world_layout[0]} PP={world_layout[1]} "
            f"EP={world_layout[2]}, not the requested --tp {tp} --pp {pp} --ep {ep}; run the "
            "import in its own processes"
        )
    dist.barrier()  # every rank checked --out before rank 0 creates anything there
    padded = dataclasses.replace(
        source.arch, vocab_size=padded_vocab_size(source.arch.vocab_size, tp=tp)
    )
    tconfig = make_transformer_config(
        padded,
        model=job.model,
        parallel=job.parallel,
        train=job.train,
        extra={"perform_initialization": False},  # every parameter is overwritten
    )
    gpt = build_gpt_model(
        padded,
        tconfig,
        model=job.model,
        pre_process=dims.is_first_pipeline_stage,
        post_process=dims.is_last_pipeline_stage,
    )
    weights = HFWeights(source.model_dir)
    try:
        with progress_bar(
            "import layers (rank 0)",
            total=len(gpt.decoder.layers),
            enabled=show_progress and dims.rank == 0,
        ) as advance:
            load_hf_into_chunk(
                gpt, weights, arch=source.arch, tp_rank=dims.tp_rank, tp=tp, advance=advance
            )
    finally:
        weights.close()
    # save_checkpoint gives a bare chunk the "module." keys of DDP-wrapped training saves.
    return save_checkpoint(out_dir, step=0, model=[gpt], config_yaml=to_yaml(job))
