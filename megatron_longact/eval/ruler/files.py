"""RULER as the official pipeline writes it: its generated jsonl files and its essay haystack.

NVIDIA/RULER (at c3f5e3b) ``scripts/run.sh`` writes the samples of one length to
``<root>/<model>/synthetic/<length>/data/<task>/validation.jsonl``; every line is (e.g.
``scripts/data/synthetic/qa.py:213-220``, ``niah.py:283-290``)::

    {"index": int, "input": str, "outputs": [str, ...], "length": int,
     "length_w_model_temp": int, "answer_prefix": str, ...}

``input`` already holds the model template chosen at preparation (``prepare.py:101``), and
``pred/call_api.py:305`` sends ``input + answer_prefix`` to a completion endpoint as is, so these
samples are sent without our chat template. NIAH writes the answer's character offset into
``index`` (``niah.py:281``), so our sample index is the line position instead.

The essay haystack: ``scripts/data/synthetic/json/download_paulgraham_essay.py`` joins the
downloaded ``.txt`` essays in name order into ``PaulGrahamEssays.json`` (``{"text": ...}``);
:func:`load_haystack_text` reads that file or the folder of ``.txt`` files.
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron_longact.data.jsonl import DataFormatError
from megatron_longact.data.records import read_records
from megatron_longact.eval.ruler.config import RULER_TASKS
from megatron_longact.eval.ruler.layout import RulerSample

RULER_SUBSET_FILE = "validation.jsonl"  # prepare.py's default --subset


def _length_of_dir(data_dir: Path) -> int | None:
    """The ``<length>`` of ``.../<length>/data`` (run.sh's layout), or None."""
    for name in (data_dir.name, data_dir.parent.name):
        if name.isdigit():
            return int(name)
    return None


def _task_files(data_dir: Path) -> list[tuple[str, Path]]:
    if data_dir.is_file():
        return [(data_dir.parent.name, data_dir)]
    found = sorted(
        (task_dir.name, task_dir / RULER_SUBSET_FILE)
        for task_dir in data_dir.iterdir()
        if (task_dir / RULER_SUBSET_FILE).is_file()
    )
    if not found:
        raise FileNotFoundError(
            f"{data_dir}: no <task>/{RULER_SUBSET_FILE} inside; point eval.ruler_data_dirs at "
            "the data folder NVIDIA/RULER's scripts/run.sh writes (.../<length>/data)"
        )
    return found


def load_ruler_dir(
    data_dir: str | Path, *, tasks: tuple[str, ...] | None = None
) -> list[RulerSample]:
    """Samples of RULER's own generated data: a ``.../<length>/data`` folder or one task file.

    Args:
        data_dir: a folder of ``<task>/validation.jsonl`` files, or one such file (the task
            is its folder's name).
        tasks: keep only these tasks (None: all found).

    ``max_seq_length`` is the ``<length>`` folder of run.sh's layout, else the largest
    ``length`` in the file. Raises FileNotFoundError / DataFormatError naming the file, the
    line and the field (an unknown task names the known ones).
    """
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise FileNotFoundError(f"RULER data {data_dir} not found; check eval.ruler_data_dirs")
    samples: list[RulerSample] = []
    for task, path in _task_files(data_dir):
        if tasks is not None and task not in tasks:
            continue
        if task not in RULER_TASKS:
            raise DataFormatError(
                f"{path}: task folder {task!r} is not a RULER task; known: {sorted(RULER_TASKS)}"
            )
        rows = list(read_records(path, required_fields=("input", "outputs", "length")))
        lengths = [row["length"] for _, row in rows]
        max_seq_length = _length_of_dir(path.parent.parent) or max(lengths, default=0)
        for position, (where, row) in enumerate(rows):
            outputs = row["outputs"]
            if not (isinstance(outputs, list) and all(isinstance(o, str) for o in outputs)):
                raise DataFormatError(f"{where}: field 'outputs' must be a list of strings")
            if not isinstance(row["input"], str) or not isinstance(row["length"], int):
                raise DataFormatError(f"{where}: 'input' must be a string and 'length' an int")
            samples.append(
                RulerSample(
                    task=task,
                    index=position,
                    input=row["input"],
                    answer_prefix=str(row.get("answer_prefix") or ""),
                    outputs=tuple(outputs),
                    num_tokens=row["length"],
                    max_seq_length=max_seq_length,
                )
            )
    return samples


def load_haystack_text(path: str | Path) -> str:
    """The essay haystack: RULER's ``PaulGrahamEssays.json`` or a folder of ``.txt`` essays
    joined in name order (as ``download_paulgraham_essay.py`` builds that file)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise FileNotFoundError(
                f"{path}: no .txt essays inside; eval.ruler_haystack_path takes a folder of .txt "
                "files or RULER's PaulGrahamEssays.json"
            )
        return "".join(f.read_text(encoding="utf-8") for f in files)
    if not path.is_file():
        raise FileNotFoundError(f"haystack {path} not found; check eval.ruler_haystack_path")
    if path.suffix == ".json":
        try:
            text = json.loads(path.read_text(encoding="utf-8"))["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DataFormatError(
                f"{path}: expected RULER's PaulGrahamEssays.json, an object with a 'text' string"
            ) from err
        if not isinstance(text, str):
            raise DataFormatError(f"{path}: field 'text' must be a string")
        return text
    return path.read_text(encoding="utf-8")
