"""Export a megatron checkpoint (ours, any TP/PP, with or without optimizer) to a HF folder.

Runs in ONE process: ``dist_checkpointing`` reshards on read, so the saved TP/PP does not
matter. The checkpoint is read one layer at a time: for each layer a template of full-shape
``ShardedTensor`` slices (layer i of every stacked ``decoder.layers.*`` key) is loaded, split
into HF tensors and handed to a :class:`ShardWriter` that flushes bounded-size shards as it
goes. Peak memory is one layer plus one shard (plus the embedding, the largest tensor).
``load_plain_tensors`` would be simpler but loads every tensor at once, optimizer moments
included (about 3x the model in fp32 for a training checkpoint).

The folder is written under a temporary name next to ``out`` and renamed at the end, so a
failure leaves nothing that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from megatron_longact.errors import UserError
from megatron_longact.models.hf_config import (
    HFArchitecture,
    parse_hf_config,
    read_hf_config,
    resolve_model_dir,
)
from megatron_longact.models.hf_weights.hf_files import (
    ShardWriter,
    copy_tokenizer_files,
    has_tokenizer,
    parse_size,
)
from megatron_longact.models.hf_weights.mapping import (
    HF_EMBEDDING,
    HF_FINAL_NORM,
    HF_LM_HEAD,
    MCORE_EMBEDDING,
    MCORE_FINAL_NORM,
    MCORE_LAYER_PREFIX,
    MCORE_OUTPUT,
    STACKED_EXPERTS,
    check_representable,
    check_rope_parsed,
    hf_layer_name,
    hf_layer_shapes,
    layer_to_hf,
    strip_checkpoint_prefix,
)
from megatron_longact.models.hf_weights.progress import progress_bar

logger = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_SIZE = "5GB"
DEFAULT_EXPERT_CHUNK_BYTES = 2 << 30
"""Largest slice of one MoE layer's experts read at once (Qwen3-235B-A22B: 128 experts of
37.7 MB in bf16, 4.8 GB a layer, read as 4 chunks of 32 experts; :func:`_expert_chunks`)."""
CONFIG_YAML = "config.yaml"
GENERATION_CONFIG = "generation_config.json"
HF_ARCHITECTURES = {
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "llama": "LlamaForCausalLM",
}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_GENERATION_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


@dataclass(frozen=True, kw_only=True)
class ExportSources:
    """Where the exported config and tokenizer come from."""

    config_dir: Path
    tokenizer_dir: Path | None


def _run_config(ckpt: Path) -> dict[str, Any] | None:
    """The checkpoint's ``config.yaml`` as a plain dict (read leniently: only two sections
    matter here, and a newer schema must not stop an export)."""
    path = ckpt / CONFIG_YAML
    if not path.is_file():
        return None
    tree = yaml.safe_load(path.read_text()) or {}
    return tree if isinstance(tree, dict) else None


def resolve_sources(
    ckpt: Path, *, hf_dir: str | Path | None, tokenizer_dir: str | Path | None
) -> ExportSources:
    """Source config: ``hf_dir``, else the model named by the checkpoint's ``config.yaml``
    (``model.hf_path`` or ``model.preset``). Tokenizer: ``tokenizer_dir``, else ``hf_dir``'s,
    else ``data.tokenizer_path`` of ``config.yaml`` (None there meant the tiny tokenizer)."""
    run = _run_config(ckpt)
    if hf_dir is not None:
        config_dir = Path(hf_dir)
        if not (config_dir / "config.json").is_file():
            raise FileNotFoundError(f"--hf-dir {config_dir}: no config.json there")
    elif run is not None:
        from megatron_longact.config.schema import ModelConfig

        model = run.get("model") or {}
        try:
            config_dir = resolve_model_dir(
                hf_path=model.get("hf_path"), preset=model.get("preset", ModelConfig().preset)
            )
        except (FileNotFoundError, ValueError) as err:
            raise FileNotFoundError(
                f"{ckpt / CONFIG_YAML} names a model whose config.json is gone ({err}); pass "
                "--hf-dir with the source model's folder"
            ) from err
    else:
        raise FileNotFoundError(
            f"{ckpt} has no {CONFIG_YAML}; pass --hf-dir with the source model's folder"
        )

    if tokenizer_dir is not None:
        tokenizer = Path(tokenizer_dir)
        if not has_tokenizer(tokenizer):
            raise FileNotFoundError(
                f"--tokenizer {tokenizer}: no tokenizer.json or tokenizer_config.json there"
            )
    elif hf_dir is not None and has_tokenizer(Path(hf_dir)):
        tokenizer = Path(hf_dir)
    elif run is not None:
        from megatron_longact.data.tokenizer import TINY_TOKENIZER_DIR

        path = (run.get("data") or {}).get("tokenizer_path")
        tokenizer = Path(path) if path else TINY_TOKENIZER_DIR
        if not path:
            logger.warning(
                "%s has data.tokenizer_path null: copying the tiny tokenizer such runs use; "
                "pass --tokenizer to include another",
                ckpt / CONFIG_YAML,
            )
    else:
        tokenizer = None
    if tokenizer is not None and not has_tokenizer(tokenizer):
        logger.warning("tokenizer folder %s is gone; exporting without tokenizer", tokenizer)
        tokenizer = None
    return ExportSources(config_dir=config_dir, tokenizer_dir=tokenizer)


@contextlib.contextmanager
def single_process_group() -> Iterator[None]:
    """``dist_checkpointing`` needs a default process group; a world of one when none exists
    (torn down afterwards). Refuses a larger world: the export is a one-process job."""
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise UserError(
                "mcore2hf runs in one process (dist_checkpointing reshards any TP/PP); run it "
                "without torchrun/srun"
            )
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _load(
    ckpt: Path,
    metadata: dict,
    keys: list[str],
    *,
    layer: int | None = None,
    expert_chunk: tuple[int, int] | None = None,
) -> dict[str, torch.Tensor]:
    """Full tensors ``keys`` (or layer ``layer`` of stacked [L, ...] keys) from ``ckpt``.

    ``expert_chunk`` (index, chunks): of stacked expert keys [L, E, ...], only experts
    ``index * E/chunks`` .. of layer ``layer`` (bounded memory for large MoE layers).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    template = {}
    for key in keys:
        shape, dtype = tuple(metadata[key].global_shape), metadata[key].dtype
        if layer is None:
            template[key] = ShardedTensor.from_rank_offsets(
                key, torch.empty(shape, dtype=dtype), replica_id=0
            )
        elif expert_chunk is not None:
            index, chunks = expert_chunk
            template[key] = ShardedTensor.from_rank_offsets(
                key,
                torch.empty((1, shape[1] // chunks, *shape[2:]), dtype=dtype),
                (0, layer, shape[0]),
                (1, index, chunks),
                replica_id=0,
            )
        else:
            template[key] = ShardedTensor.from_rank_offsets(
                key,
                torch.empty((1, *shape[1:]), dtype=dtype),
                (0, layer, shape[0]),
                replica_id=0,
            )
    # One reader holds every piece: the world-of-one "access pattern" check does not apply.
    loaded = dist_checkpointing.load(template, str(ckpt), validate_access_integrity=False)
    # The result also holds the checkpoint's common (non-tensor) state; keep the tensors asked for.
    return {k: (loaded[k][0] if layer is not None else loaded[k]) for k in keys}


def _model_keys(metadata: dict) -> dict[str, str]:
    """{megatron name without prefix: checkpoint key} for model tensors (not optimizer)."""
    keys = {}
    for key in metadata:
        name = strip_checkpoint_prefix(key)
        if name is not None and not key.endswith("_extra_state"):
            keys[name] = key
    return keys


def check_checkpoint(
    keys: dict[str, str], metadata: dict, *, arch: HFArchitecture, source: str
) -> None:
    """Raises ValueError when the checkpoint's tensors do not fit the HF config ``arch``."""
    if MCORE_EMBEDDING not in keys:
        raise UserError(f"{source}: no model weights ({MCORE_EMBEDDING}) in the checkpoint")
    vocab_rows, hidden = tuple(metadata[keys[MCORE_EMBEDDING]].global_shape)
    if hidden != arch.hidden_size or vocab_rows < arch.vocab_size:
        raise UserError(
            f"{source}: embedding is [{vocab_rows}, {hidden}] but config.json says vocab_size="
            f"{arch.vocab_size}, hidden_size={arch.hidden_size}; pass the source model's --hf-dir"
        )
    for name, key in keys.items():
        if name.startswith(MCORE_LAYER_PREFIX):
            layers = metadata[key].global_shape[0]
            if layers != arch.num_layers:
                raise UserError(
                    f"{source}: {key} stacks {layers} layers but config.json says "
                    f"num_hidden_layers={arch.num_layers}; pass the source model's --hf-dir"
                )
    if not arch.tie_word_embeddings and MCORE_OUTPUT not in keys:
        raise UserError(
            f"{source}: config.json has tie_word_embeddings=false but the checkpoint holds no "
            f"{MCORE_OUTPUT}; pass the source model's --hf-dir"
        )


def _expert_chunks(metadata: dict, keys: list[str], *, budget: int) -> int:
    """Fewest equal chunks of a layer's experts (a divisor of E) whose stacked expert
    tensors take at most ``budget`` bytes (one expert per chunk if nothing fits)."""
    if not keys:
        return 1
    experts = metadata[keys[0]].global_shape[1]
    per_expert = sum(
        math.prod(metadata[k].global_shape[2:]) * metadata[k].dtype.itemsize for k in keys
    )
    for chunks in range(1, experts + 1):
        if experts % chunks == 0 and per_expert * experts // chunks <= budget:
            return chunks
    return experts


def _layer_parts(ckpt: Path, metadata: dict, expert_keys: dict[str, str], *, layer, chunks):
    """Yields (first expert, {suffix: [E/chunks, ...]}) for each chunk of layer ``layer``."""
    experts = metadata[next(iter(expert_keys.values()))].global_shape[1]
    for index in range(chunks):
        loaded = _load(
            ckpt, metadata, list(expert_keys.values()), layer=layer, expert_chunk=(index, chunks)
        )
        yield index * (experts // chunks), {s: loaded[k] for s, k in expert_keys.items()}


def iter_hf_tensors(
    ckpt: Path,
    metadata: dict,
    keys: dict[str, str],
    *,
    arch: HFArchitecture,
    advance=None,
    expert_bytes: int = DEFAULT_EXPERT_CHUNK_BYTES,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (HF name, tensor) for the whole model, reading one layer at a time (a MoE
    layer's experts in chunks of at most ``expert_bytes``)."""
    vocab = arch.vocab_size
    embedding = _load(ckpt, metadata, [keys[MCORE_EMBEDDING]])[keys[MCORE_EMBEDDING]]
    yield HF_EMBEDDING, embedding[:vocab]  # drop megatron's vocab padding
    del embedding
    layer_keys = {
        name[len(MCORE_LAYER_PREFIX) :]: key
        for name, key in keys.items()
        if name.startswith(MCORE_LAYER_PREFIX)
    }
    expert_keys = {s: k for s, k in layer_keys.items() if s in STACKED_EXPERTS}
    dense_keys = {s: k for s, k in layer_keys.items() if s not in STACKED_EXPERTS}
    chunks = _expert_chunks(metadata, list(expert_keys.values()), budget=expert_bytes)
    for layer in range(arch.num_layers):
        loaded = _load(ckpt, metadata, list(dense_keys.values()), layer=layer)
        tensors = {suffix: loaded[key] for suffix, key in dense_keys.items()}
        if not expert_keys:
            yield from layer_to_hf(tensors, layer=layer, arch=arch).items()
        else:
            names = set()
            for part in _layer_parts(ckpt, metadata, expert_keys, layer=layer, chunks=chunks):
                first, part_tensors = part
                hf = layer_to_hf(
                    {**tensors, **part_tensors},
                    layer=layer,
                    arch=arch,
                    first_expert=first,
                    complete=False,
                )
                tensors = {}  # the dense tensors go out with the first chunk
                names.update(hf)
                yield from hf.items()
            expected = {hf_layer_name(layer, s) for s in hf_layer_shapes(arch)}
            if names != expected:
                raise UserError(
                    f"layer {layer}: the checkpoint gives {len(names)} tensors, config.json "
                    f"implies {len(expected)} (e.g. {sorted(expected - names)[:3]} missing); "
                    "pass the source model's --hf-dir"
                )
        if advance is not None:
            advance()
    final = _load(ckpt, metadata, [keys[MCORE_FINAL_NORM]])
    yield HF_FINAL_NORM, final[keys[MCORE_FINAL_NORM]]
    if not arch.tie_word_embeddings:
        head = _load(ckpt, metadata, [keys[MCORE_OUTPUT]])[keys[MCORE_OUTPUT]]
        yield HF_LM_HEAD, head[:vocab]


def _export_config(hf_config: dict[str, Any], *, dtype: torch.dtype) -> dict[str, Any]:
    config = dict(hf_config)
    config.setdefault("architectures", [HF_ARCHITECTURES[config["model_type"]]])
    dtype_keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
    for key in dtype_keys:
        config[key] = _DTYPE_NAMES[dtype]
    return config


def _write_metadata_files(tmp: Path, *, config: dict[str, Any], sources: ExportSources) -> None:
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if (sources.config_dir / GENERATION_CONFIG).is_file():
        shutil.copy2(sources.config_dir / GENERATION_CONFIG, tmp / GENERATION_CONFIG)
    else:
        generation = {k: config[k] for k in _GENERATION_KEYS if config.get(k) is not None}
        generation["_from_model_config"] = True
        (tmp / GENERATION_CONFIG).write_text(json.dumps(generation, indent=2) + "\n")
    if sources.tokenizer_dir is not None:
        copy_tokenizer_files(sources.tokenizer_dir, tmp)
    else:
        logger.warning("no tokenizer written; pass --tokenizer to include one")


def export_checkpoint(
    *,
    load: str | Path,
    out_dir: str | Path,
    hf_dir: str | Path | None = None,
    tokenizer_dir: str | Path | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    show_progress: bool = True,
) -> Path:
    """Writes the model in checkpoint ``load`` as a Hugging Face folder ``out_dir``.

    ``load``: a checkpoint directory or a ``save_dir`` with ``latest``. Tensors keep the
    checkpoint's dtype; the vocabulary is trimmed to config.json's ``vocab_size``. One process,
    no megatron parallel state needed (see :func:`single_process_group`). Returns ``out_dir``.

    Raises:
        FileNotFoundError: no checkpoint at ``load``; no source config (pass ``hf_dir``).
        FileExistsError: ``out_dir`` exists and is not empty.
        ValueError: the checkpoint does not match the source config.
    """
    from megatron.core import dist_checkpointing

    from megatron_longact.checkpoint.dist_ckpt import latest_checkpoint
    from megatron_longact.checkpoint.integrity import corrupt_error, verify_checkpoint

    ckpt = latest_checkpoint(load)
    if ckpt is None:
        raise FileNotFoundError(
            f"--load {load}: no checkpoint there (no 'latest' file and no metadata.json); point "
            "it at a save_dir or an iter_* folder"
        )
    if (problem := verify_checkpoint(ckpt)) is not None:  # an export must not spread corruption
        raise corrupt_error(ckpt, problem)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} exists and is not empty; remove it or pick another")
    sources = resolve_sources(ckpt, hf_dir=hf_dir, tokenizer_dir=tokenizer_dir)
    config_path = sources.config_dir / "config.json"
    hf_config = read_hf_config(sources.config_dir)
    check_representable(hf_config, source=str(config_path))
    arch = parse_hf_config(hf_config, source=str(config_path))
    check_rope_parsed(hf_config, arch, source=str(config_path))
    max_bytes = parse_size(max_shard_size)

    with single_process_group():
        metadata = dist_checkpointing.load_tensors_metadata(str(ckpt))
        keys = _model_keys(metadata)
        check_checkpoint(keys, metadata, arch=arch, source=str(ckpt))
        dtype = metadata[keys[MCORE_EMBEDDING]].dtype
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            writer = ShardWriter(tmp, max_shard_bytes=max_bytes)
            with progress_bar(
                f"export {ckpt.name}", total=arch.num_layers, enabled=show_progress
            ) as advance:
                for name, tensor in iter_hf_tensors(
                    ckpt, metadata, keys, arch=arch, advance=advance
                ):
                    writer.add(name, tensor)
            writer.finish()
            _write_metadata_files(
                tmp, config=_export_config(hf_config, dtype=dtype), sources=sources
            )
            if out.exists():
                out.rmdir()  # empty (checked above)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out
