"""Hugging Face safetensors folders: lazy per-tensor reading and bounded-size shard writing."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_longact.errors import UserError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SHARD_NAME = "model-{:05d}-of-{:05d}.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20}
_SIZE_UNITS["GIB"] = 2**30


def parse_size(text: str | int) -> int:
    """``"5GB"``, ``"500MB"``, ``"64KiB"`` or a byte count -> bytes (HF's ``max_shard_size``)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise UserError(f"--max-shard-size={text!r}: write a size like 5GB, 500MB or 4096")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def open_safetensors(path: Path):
    """``safe_open(path)``; a truncated or corrupt file is a ValueError naming it.

    safetensors checks the header against the file size when it opens a file ("incomplete
    metadata, file not fully covered" for a truncated one) but does not say which file.
    """
    try:
        return safe_open(path, framework="pt")
    except Exception as err:  # noqa: BLE001 - SafetensorError is not importable by name
        raise UserError(
            f"{path}: not a readable safetensors file ({err}); it is truncated or corrupt: "
            "copy or download it again"
        ) from err


class HFWeights:
    """Read-only, lazy view of the safetensors in a local HF model folder.

    Opens ``model.safetensors.index.json`` (or a lone ``model.safetensors``) and checks that
    every shard it names exists, before anything is read. Tensors are read one at a time (or
    a slice of one) with ``safe_open``, so memory holds only what the caller asked for.
    """

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        index = self.model_dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise UserError(f"{index}: not a safetensors index ({err!r})") from err
            self.source = str(index)
        elif (self.model_dir / SINGLE_FILE).is_file():
            with open_safetensors(self.model_dir / SINGLE_FILE) as handle:
                weight_map = dict.fromkeys(handle.keys(), SINGLE_FILE)
            self.source = str(self.model_dir / SINGLE_FILE)
        else:
            raise FileNotFoundError(
                f"{self.model_dir}: neither {INDEX_FILE} nor {SINGLE_FILE}; point --hf-dir at a "
                "Hugging Face model folder saved with safetensors"
            )
        missing = sorted({f for f in weight_map.values() if not (self.model_dir / f).is_file()})
        if missing:
            raise FileNotFoundError(
                f"{self.source} names shard file(s) that are not in {self.model_dir}: "
                f"{missing}; copy the complete model folder"
            )
        self.weight_map: dict[str, str] = weight_map
        self._handles: dict[str, object] = {}

    def _handle(self, name: str):
        if name not in self.weight_map:
            raise UserError(f"{self.source}: no tensor named {name!r}")
        file = self.weight_map[name]
        if file not in self._handles:
            self._handles[file] = open_safetensors(self.model_dir / file)
        return self._handles[file]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """{name: shape} of every tensor, from the file headers (no tensor data is read)."""
        return {
            name: tuple(self._handle(name).get_slice(name).get_shape()) for name in self.weight_map
        }

    def dtype(self, name: str) -> torch.dtype:
        return self.read(name, dim=0, start=0, stop=1).dtype

    def read(
        self, name: str, *, dim: int = 0, start: int | None = None, stop: int | None = None
    ) -> torch.Tensor:
        """Tensor ``name``, or only indices [start, stop) of ``dim`` (read from disk lazily)."""
        handle = self._handle(name)
        if start is None and stop is None:
            return handle.get_tensor(name)
        sliced = handle.get_slice(name)
        index = [slice(None)] * len(sliced.get_shape())
        index[dim] = slice(start, stop)
        return sliced[tuple(index)]

    def close(self) -> None:
        self._handles.clear()


class ShardWriter:
    """Writes tensors into safetensors shards of at most ``max_shard_bytes`` each.

    Tensors are buffered until the next one would overflow the shard (a tensor larger than
    the limit gets a shard of its own), so peak memory is about one shard. :meth:`finish`
    names the shards ``model-0000i-of-0000n.safetensors`` and writes the index, as
    ``save_pretrained`` does (a single shard is ``model.safetensors``, without an index).
    """

    def __init__(self, out_dir: Path, *, max_shard_bytes: int) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max shard size must be positive, got {max_shard_bytes}")
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        # Clone: a view would make safetensors serialise the whole base storage.
        self._pending[name] = tensor.detach().contiguous().clone()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        if not self._pending:
            return
        file = f"shard-{len(self._shards):05d}.tmp"
        save_file(self._pending, str(self.out_dir / file), metadata={"format": "pt"})
        self._shards.append((file, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Flushes, renames the shards to their final names, writes the index; returns names."""
        self._flush()
        count = len(self._shards)
        if count == 1:
            (self.out_dir / self._shards[0][0]).rename(self.out_dir / SINGLE_FILE)
            return [SINGLE_FILE]
        weight_map, finals = {}, []
        for i, (file, names) in enumerate(self._shards):
            final = SHARD_NAME.format(i + 1, count)
            (self.out_dir / file).rename(self.out_dir / final)
            weight_map.update(dict.fromkeys(names, final))
            finals.append(final)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return finals


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copies the tokenizer files ``src`` has into ``dst``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
