"""JSON Lines reading with file/line error context, and crash-safe writing.

JSONL (one JSON object per line) is the project's own data format (the synthetic sets, RL
records, predictions); ``records.read_records`` reads it through here and adds parquet, JSON
lists and Hugging Face dataset folders. Errors name the file, the 1-based line and the field so
a user can open the file and fix it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from megatron_longact.errors import UserError


class DataFormatError(UserError):
    """A data file has a line that cannot be used; the message names the file and line."""


def format_location(path: str | os.PathLike[str], line_no: int) -> str:
    """``"path:line"``, the prefix every data error starts with (editors jump to it)."""
    return f"{os.fspath(path)}:{line_no}"


def read_jsonl(
    path: str | os.PathLike[str], *, required_fields: Sequence[str] = ()
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_no, record)`` for each non-blank line of a JSONL file.

    Args:
        path: the ``.jsonl`` file (UTF-8).
        required_fields: top-level keys every record must have.

    Yields:
        ``(line_no, record)`` with ``line_no`` 1-based, as an editor shows it; blank lines
        (only whitespace) are skipped but still counted.

    Raises:
        FileNotFoundError: ``path`` does not exist or is not a file.
        DataFormatError: a line is not UTF-8, not valid JSON, not a JSON object, or lacks a
            required field; the message names the file, the line and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"JSONL file not found: {path}. Check the path in your config, or create the "
            f"synthetic data with `longact data --out-dir DIR`."
        )
    # Binary read so a bad byte is reported at its line instead of aborting the whole read.
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = format_location(path, line_no)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataFormatError(
                    f"{where}: line is not valid UTF-8 ({err.reason} at byte {err.start}); "
                    f"re-save the file as UTF-8."
                ) from err
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFormatError(
                    f"{where}: malformed JSON ({err.msg} at column {err.colno}); each line must "
                    f"hold exactly one complete JSON object."
                ) from err
            if not isinstance(record, dict):
                raise DataFormatError(
                    f"{where}: expected a JSON object, got {type(record).__name__}; each line "
                    f"must be one object {{...}} with fields {list(required_fields)}."
                )
            for field in required_fields:
                if field not in record:
                    raise DataFormatError(
                        f"{where}: missing required field {field!r} (fields present: "
                        f"{sorted(record)}); add {field!r} to this record."
                    )
            yield line_no, record


def write_jsonl(path: str | os.PathLike[str], records: Iterable[dict[str, Any]]) -> int:
    """Write records as JSONL atomically; return the number of records written.

    The records go to a temporary file in the same folder, which is fsynced and then
    ``os.replace``d over ``path``: a crash mid-write leaves any previous ``path`` intact and
    never a half-written file. Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder as the target so os.replace is a rename within one file system (atomic).
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    num_written = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False))
                f.write("\n")
                num_written += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return num_written
