"""Import a Hugging Face Qwen3/Qwen3-MoE/Qwen2/Llama folder into our checkpoint at any TP/PP/EP.

Every rank builds its own GPTModel chunk (no optimizer, no random init), reads only the HF
tensors (or slices of them) its parameters need, one at a time, copies them in, and all ranks
save together with :func:`save_checkpoint` (weights only, step 0, atomic). A run starts from
the result with ``checkpoint.load_dir=<out> checkpoint.load_weights_only=true``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from megatron_longact.convert.hf_files import HFWeights, has_tokenizer
from megatron_longact.convert.mapping import (
    EXPERT_FC1,
    GATE_UP,
    HF_EMBEDDING,
    HF_EXPERT_DOWN,
    HF_EXPERT_GATE_UP,
    HF_FINAL_NORM,
    HF_LM_HEAD,
    HF_ROUTER,
    MCORE_EMBEDDING,
    MCORE_FINAL_NORM,
    MCORE_LAYER_PREFIX,
    MCORE_OUTPUT,
    MCORE_ROUTER,
    NORMS,
    QKV,
    ROW_PARALLEL,
    ROW_PARALLEL_DIM,
    check_hf_tensors,
    check_representable,
    check_rope_parsed,
    expert_param,
    hf_layer_name,
    padded_vocab_size,
    tp_block,
)
from megatron_longact.convert.progress import progress_bar
from megatron_longact.models.hf_config import HFArchitecture, parse_hf_config, read_hf_config
from megatron_longact.models.qkv_layout import QKVLayout

ImportDtype = Literal["auto", "fp32", "bf16"]


@dataclass(frozen=True, kw_only=True)
class ExpertShard:
    """Where this rank's experts sit (MoE): global index of local expert 0 and the
    expert-tensor-parallel rank (megatron's expert grid, ``parallel_state``)."""

    first_expert: int = 0
    etp_rank: int = 0

    @classmethod
    def of_chunk(cls, gpt: torch.nn.Module) -> ExpertShard:
        """This rank's coordinates, from megatron's parallel state (set by init)."""
        from megatron.core import parallel_state

        experts = getattr(gpt.config, "num_moe_experts", None)
        if not experts:
            return cls()
        ep = parallel_state.get_expert_model_parallel_world_size()
        return cls(
            first_expert=parallel_state.get_expert_model_parallel_rank() * (experts // ep),
            etp_rank=parallel_state.get_expert_tensor_parallel_rank(),
        )


@dataclass(frozen=True, kw_only=True)
class HFSource:
    """A validated HF model folder: its config, the architecture, the dtype of its weights."""

    model_dir: Path
    hf_config: dict[str, Any]
    arch: HFArchitecture
    weights_dtype: torch.dtype


def inspect_hf_dir(hf_dir: str | Path) -> HFSource:
    """Checks an HF folder before anything is built or written (cheap: reads headers only).

    Raises:
        FileNotFoundError: no ``config.json``, no safetensors, or a shard the index names is
            missing (the message names the file).
        ValueError: a config field the mapping cannot represent (names the field), or tensor
            names or shapes that do not match the config (names the tensor).
    """
    model_dir = Path(hf_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"--hf-dir {model_dir}: no config.json; point it at a HF folder")
    hf_config = read_hf_config(model_dir)
    check_representable(hf_config, source=str(config_path))
    arch = parse_hf_config(hf_config, source=str(config_path))
    check_rope_parsed(hf_config, arch, source=str(config_path))
    weights = HFWeights(model_dir)
    check_hf_tensors(weights.shapes(), arch=arch, source=weights.source)
    source = HFSource(
        model_dir=model_dir,
        hf_config=hf_config,
        arch=arch,
        weights_dtype=weights.dtype(HF_EMBEDDING),
    )
    weights.close()
    return source


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


def _vocab_rows(weights: HFWeights, name: str, *, start: int, rows: int, vocab: int):
    """Rows [start, start+rows) of an HF [V, H] tensor; rows past V (vocab padding) are 0."""
    stop = min(start + rows, vocab)
    if start >= stop:
        first = weights.read(name, dim=0, start=0, stop=1)
        return first.new_zeros((rows, first.shape[1]))
    part = weights.read(name, dim=0, start=start, stop=stop)
    if part.shape[0] == rows:
        return part
    return torch.cat([part, part.new_zeros((rows - part.shape[0], part.shape[1]))])


def _layer_tensor(
    suffix: str,
    local_shape: torch.Size,
    *,
    layer: int,
    weights: HFWeights,
    layout: QKVLayout,
    tp_rank: int,
    tp: int,
    experts: ExpertShard,
) -> torch.Tensor:
    """This rank's part of one megatron layer parameter, read from the HF tensors."""

    def name(hf_suffix: str) -> str:
        return hf_layer_name(layer, hf_suffix)

    if suffix == MCORE_ROUTER:
        return weights.read(name(HF_ROUTER))
    if (expert := expert_param(suffix)) is not None:
        index, which = expert
        index += experts.first_expert
        if which == EXPERT_FC1:  # [gate; up] rows of this expert-TP rank
            rows = local_shape[0] // 2
            start = experts.etp_rank * rows
            gate, up = (
                weights.read(name(n.format(index)), dim=0, start=start, stop=start + rows)
                for n in HF_EXPERT_GATE_UP
            )
            return torch.cat([gate, up])
        cols = local_shape[ROW_PARALLEL_DIM]
        start = experts.etp_rank * cols
        return weights.read(
            name(HF_EXPERT_DOWN.format(index)), dim=ROW_PARALLEL_DIM, start=start, stop=start + cols
        )
    if suffix in NORMS:
        return weights.read(name(NORMS[suffix]))
    if suffix in ROW_PARALLEL:
        cols = local_shape[ROW_PARALLEL_DIM]
        start = tp_rank * cols
        return weights.read(
            name(ROW_PARALLEL[suffix]), dim=ROW_PARALLEL_DIM, start=start, stop=start + cols
        )
    if suffix in QKV:
        # One layer's q, k, v in full: fusing first keeps the row formula in one place
        # (QKVLayout), and ranks may share a query group when G < TP.
        q, k, v = (weights.read(name(s)) for s in QKV[suffix])
        return tp_block(layout.fuse(q, k, v), dim=0, tp_rank=tp_rank, tp=tp)
    if suffix in GATE_UP:
        rows = local_shape[0] // 2
        start = tp_rank * rows
        gate, up = (
            weights.read(name(s), dim=0, start=start, stop=start + rows) for s in GATE_UP[suffix]
        )
        return torch.cat([gate, up])
    raise ValueError(
        f"megatron parameter decoder.layers.*.{suffix} has no Hugging Face source in "
        "convert/mapping.py; the layer spec has a parameter this converter does not know"
    )


@torch.no_grad()
def load_hf_into_chunk(
    gpt: torch.nn.Module,
    weights: HFWeights,
    *,
    arch: HFArchitecture,
    tp_rank: int,
    tp: int,
    advance: Callable[[], None] = lambda: None,
) -> None:
    """Copies this rank's slices of the HF weights into every parameter of ``gpt``.

    ``gpt`` is this rank's GPTModel chunk (any spec, any TP/PP, vocab possibly padded);
    ``arch`` describes the HF checkpoint (its unpadded vocab). Reads tensor by tensor, so
    peak extra memory is one layer's q/k/v. No collectives. ``advance`` is called once per
    finished layer (a progress bar).
    """
    for param_name, param in gpt.named_parameters():
        if param_name.startswith(MCORE_LAYER_PREFIX):
            continue  # below, layer by layer
        if param_name in (MCORE_EMBEDDING, MCORE_OUTPUT):
            untied_head = param_name == MCORE_OUTPUT and not arch.tie_word_embeddings
            # A tied model's last pipeline stage holds its own copy of the embedding.
            hf_name = HF_LM_HEAD if untied_head else HF_EMBEDDING
            rows = param.shape[0]
            tensor = _vocab_rows(
                weights, hf_name, start=tp_rank * rows, rows=rows, vocab=arch.vocab_size
            )
        elif param_name == MCORE_FINAL_NORM:
            hf_name, tensor = HF_FINAL_NORM, weights.read(HF_FINAL_NORM)
        else:
            raise ValueError(
                f"megatron parameter {param_name} has no Hugging Face source in convert/mapping.py"
            )
        _copy(param, tensor, name=param_name, source=hf_name, weights=weights, tp=tp)
    layout = QKVLayout.from_hf(arch)
    experts = ExpertShard.of_chunk(gpt)
    for layer_module in gpt.decoder.layers:
        layer = layer_module.layer_number - 1  # megatron numbers from 1, globally over PP
        for suffix, param in layer_module.named_parameters():
            tensor = _layer_tensor(
                suffix,
                param.shape,
                layer=layer,
                weights=weights,
                layout=layout,
                tp_rank=tp_rank,
                tp=tp,
                experts=experts,
            )
            name = f"{MCORE_LAYER_PREFIX}{layer}.{suffix}"
            _copy(param, tensor, name=name, source=f"layer {layer}", weights=weights, tp=tp)
        advance()


def _copy(
    param: torch.Tensor,
    tensor: torch.Tensor,
    *,
    name: str,
    source: str,
    weights: HFWeights,
    tp: int,
) -> None:
    if tensor.shape != param.shape:
        raise ValueError(
            f"{weights.source}: {source} gives shape {tuple(tensor.shape)} but megatron's "
            f"{name} holds {tuple(param.shape)} at TP={tp}; config.json and the weights "
            "disagree"
        )
    param.copy_(tensor)


def load_hf_weights(
    gpt: torch.nn.Module,
    hf_dir: str | Path,
    *,
    arch: HFArchitecture,
    tp_rank: int,
    tp: int,
    show_progress: bool = False,
) -> HFSource:
    """Checks ``hf_dir`` (:func:`inspect_hf_dir`) and streams its weights into ``gpt``.

    ``gpt`` is this rank's bare GPTModel chunk of a run built from the same config (``arch``:
    the run's architecture, which must match the folder's). Parameters in bf16 take the HF
    values rounded to bf16. No collectives; every rank reads only its own slices. The
    caller refreshes any optimizer master copies afterwards.

    Raises:
        ValueError / FileNotFoundError: see :func:`inspect_hf_dir`; also when ``arch`` and
            the folder's config disagree (names both).
    """
    source = inspect_hf_dir(hf_dir)
    if source.arch != arch:
        raise ValueError(
            f"{source.model_dir}/config.json describes {source.arch} but the run was built as "
            f"{arch}; point model.hf_path at the folder the run's config came from"
        )
    weights = HFWeights(source.model_dir)
    try:
        with progress_bar(
            f"load {source.model_dir.name} (rank 0)",
            total=len(gpt.decoder.layers),
            enabled=show_progress,
        ) as advance:
            load_hf_into_chunk(gpt, weights, arch=arch, tp_rank=tp_rank, tp=tp, advance=advance)
    finally:
        weights.close()
    return source


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
        ValueError: the world's TP/PP differ from ``tp``/``pp``; see :func:`inspect_hf_dir`.
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
        raise ValueError(
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
