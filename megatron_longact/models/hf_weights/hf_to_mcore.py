"""Stream a Hugging Face Qwen3/Qwen3-MoE/Qwen2/Llama folder into this rank's GPTModel chunk at
any TP/PP/EP.

Every rank reads only the HF tensors (or slices of them) its parameters need, one at a time,
and copies them in: a run started from ``model.hf_path`` (``runtime.setup``) and the
``longact convert`` import (``convert.hf_import``, which then saves a checkpoint) both use it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_longact.errors import UserError
from megatron_longact.models.hf_config import HFArchitecture, parse_hf_config, read_hf_config
from megatron_longact.models.hf_weights.hf_files import HFWeights
from megatron_longact.models.hf_weights.mapping import (
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
    tp_block,
)
from megatron_longact.models.hf_weights.progress import progress_bar
from megatron_longact.models.qkv_layout import QKVLayout


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
        "models/hf_weights/mapping.py; the layer spec has a parameter this converter does not know"
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
                f"megatron parameter {param_name} has no Hugging Face source in models/hf_weights/mapping.py"
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
        raise UserError(
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
        raise UserError(
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
