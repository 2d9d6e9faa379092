"""One reader for every data file: JSONL, a JSON list, parquet, or a Hugging Face dataset folder.

The public sources ship in different containers: verl, DocQA-RL-1.6K and MemAgent as parquet,
LongBench v2 as one JSON list, RULER and InfiniteBench as JSONL, and anything passed through
``datasets`` as a ``save_to_disk`` folder. :func:`read_records` dispatches on the path and
yields plain ``dict`` rows with a location string, so every loader above it is format-blind
and every error still names the file and the line or row.

HF folders are read with pyarrow alone, no ``datasets`` needed: ``Dataset.save_to_disk``
writes ``state.json`` (listing the shards under ``_data_files``), ``dataset_info.json`` and
``data-XXXXX-of-YYYYY.arrow`` shards in Arrow's IPC *stream* format, contiguous and in order
(datasets 5.2.0 ``arrow_dataset.py:1781`` ``save_to_disk``, ``:1875`` the ``_data_files`` list;
``arrow_writer.py:628`` ``pa.RecordBatchStreamWriter``). ``DatasetDict.save_to_disk`` adds ``dataset_dict.json`` and one
such folder per split.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from megatron_longact.data.jsonl import DataFormatError, format_location, read_jsonl

PARQUET_MAGIC = b"PAR1"  # the first and last 4 bytes of every parquet file
HF_STATE_FILE = "state.json"
HF_DATASET_DICT_FILE = "dataset_dict.json"
DEFAULT_SPLIT = "train"
_ROW_BATCH = 256  # rows converted to Python objects at a time (bounded memory on big files)


def row_location(path: str | os.PathLike[str], row: int) -> str:
    """``"path: row i"`` (0-based, as ``dataset[i]`` and ``pandas.read_parquet(path).iloc[i]``)."""
    return f"{os.fspath(path)}: row {row}"


def _pyarrow():
    """pyarrow with its parquet module loaded (imported on first use: JSONL needs neither)."""
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401  (makes pyarrow.parquet available)
    except ImportError as err:  # pragma: no cover - pyarrow is in install_requires
        raise ImportError(
            "reading parquet or Hugging Face dataset folders needs pyarrow: pip install pyarrow"
        ) from err
    return pyarrow


def _is_parquet(path: Path) -> bool:
    if path.suffix == ".parquet":
        return True
    with path.open("rb") as f:
        return f.read(4) == PARQUET_MAGIC


def _rows_of_batches(batches, path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yields (location, row dict) from Arrow record batches; nested types become lists/dicts."""
    row = 0
    for batch in batches:
        for record in batch.to_pylist():
            yield row_location(path, row), record
            row += 1


def _read_parquet(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    pa = _pyarrow()
    try:
        handle = pa.parquet.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise DataFormatError(
            f"{path}: not a readable parquet file ({err}); re-download it or export it again"
        ) from err
    yield from _rows_of_batches(handle.iter_batches(batch_size=_ROW_BATCH), path)


def _read_arrow_stream(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    pa = _pyarrow()
    try:
        reader = pa.ipc.open_stream(pa.memory_map(str(path)))
    except pa.ArrowInvalid:
        try:  # an Arrow IPC *file* (Feather v2) rather than datasets' stream shards
            table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
        except pa.ArrowException as err:
            raise DataFormatError(
                f"{path}: not an Arrow stream or file ({err}); is the dataset folder complete?"
            ) from err
        yield from _rows_of_batches(table.to_batches(max_chunksize=_ROW_BATCH), path)
        return
    yield from _rows_of_batches(reader, path)


def _hf_split_folder(folder: Path, split: str | None) -> Path:
    """The folder of one split of a ``DatasetDict.save_to_disk`` folder."""
    listing = json.loads((folder / HF_DATASET_DICT_FILE).read_text(encoding="utf-8"))
    splits = list(listing.get("splits", []))
    if not splits:
        raise DataFormatError(f"{folder}/{HF_DATASET_DICT_FILE} lists no splits; save it again")
    chosen = split or (splits[0] if len(splits) == 1 else DEFAULT_SPLIT)
    if chosen not in splits:
        raise DataFormatError(
            f"{folder}: a DatasetDict folder with splits {splits}, no {chosen!r}; point the "
            f"path at one split folder, e.g. {folder / splits[0]}"
        )
    return folder / chosen


def _read_hf_folder(folder: Path, split: str | None) -> Iterator[tuple[str, dict[str, Any]]]:
    if (folder / HF_DATASET_DICT_FILE).is_file():
        folder = _hf_split_folder(folder, split)
    state_file = folder / HF_STATE_FILE
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        shards = [folder / entry["filename"] for entry in state["_data_files"]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataFormatError(
            f"{state_file}: not a Hugging Face save_to_disk state file ({err!r}); save the "
            "dataset again with Dataset.save_to_disk"
        ) from err
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: shards {missing} listed in {HF_STATE_FILE} are missing")
    for shard in shards:
        yield from _read_arrow_stream(shard)


def _read_folder(folder: Path, split: str | None) -> Iterator[tuple[str, dict[str, Any]]]:
    if (folder / HF_STATE_FILE).is_file() or (folder / HF_DATASET_DICT_FILE).is_file():
        yield from _read_hf_folder(folder, split)
        return
    # A Hub snapshot: parquet shards, possibly under data/, named "<split>-0000x-of-0000y".
    shards = sorted(folder.rglob("*.parquet"))
    if split is not None or len({p.name.split("-")[0] for p in shards}) > 1:
        wanted = split or DEFAULT_SPLIT
        shards = [p for p in shards if p.name.startswith(f"{wanted}-") or p.parent.name == wanted]
    if not shards:
        raise DataFormatError(
            f"{folder}: a folder, but neither a Hugging Face save_to_disk folder ({HF_STATE_FILE}) "
            "nor one holding .parquet shards; point the path at a .jsonl/.json/.parquet file "
            "or such a folder"
        )
    for shard in shards:
        yield from _read_parquet(shard)


def _read_json_list(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise DataFormatError(
            f"{path}: not UTF-8 text ({err.reason}); re-save it as UTF-8"
        ) from err
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from err
    if not isinstance(items, list):
        raise DataFormatError(
            f"{path}: expected a JSON list of records, got {type(items).__name__}"
        )
    for index, obj in enumerate(items):
        yield row_location(path, index), obj


def _starts_with_list(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4096).lstrip().startswith(b"[")


def read_records(
    path: str | os.PathLike[str],
    *,
    required_fields: Sequence[str] = (),
    split: str | None = None,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(location, record)`` for every row of a data file or dataset folder.

    Dispatch on ``path``:

    - a folder: a Hugging Face ``save_to_disk`` folder (``state.json`` + ``.arrow`` shards; a
      ``DatasetDict`` folder reads ``split``, default "train" or its only split), else the
      ``.parquet`` shards under it (a Hub snapshot: ``data/<split>-0000x-of-0000y.parquet``);
    - ``*.parquet`` (or a file starting with the parquet magic ``PAR1``): parquet;
    - ``*.arrow``: one Arrow stream shard;
    - a file whose first non-blank byte is ``[``: one JSON list (LongBench v2 ``data.json``);
    - anything else: JSON Lines (:func:`jsonl.read_jsonl`).

    Args:
        path: the file or folder.
        required_fields: top-level keys every record must have.
        split: the split of a DatasetDict folder or a parquet snapshot folder.

    Yields:
        ``(location, record)``: ``location`` is ``"file:line"`` (1-based) for JSONL and
        ``"file: row i"`` (0-based) for JSON lists, parquet and Arrow; ``record`` is a plain
        dict (nested lists and structs as Python lists and dicts, nulls as None).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataFormatError: a row is not an object or lacks a required field, or the container is
            unreadable; the message names the file and the line or row.
    """
    path = Path(path)
    if path.is_dir():
        rows = _read_folder(path, split)
    elif not path.is_file():
        raise FileNotFoundError(
            f"data file {path} not found; check the path in your config (JSONL, JSON list, "
            "parquet, or a Hugging Face dataset folder)"
        )
    elif _is_parquet(path):
        rows = _read_parquet(path)
    elif path.suffix == ".arrow":
        rows = _read_arrow_stream(path)
    elif _starts_with_list(path):
        rows = _read_json_list(path)
    else:
        rows = ((format_location(path, n), obj) for n, obj in read_jsonl(path))
    for where, record in rows:
        if not isinstance(record, dict):
            raise DataFormatError(
                f"{where}: expected an object with fields {list(required_fields)}, got "
                f"{type(record).__name__}"
            )
        for field in required_fields:
            if field not in record:
                raise DataFormatError(
                    f"{where}: missing required field {field!r} (fields present: "
                    f"{sorted(record)}); add {field!r} to this record"
                )
        yield where, record
