"""RL prompt records, loaders for the paper's two sources, mixing, and middle truncation.

Our record (one JSON object per line of a JSONL file)::

    {"id": str, "context": str, "question": str,
     "answer": str | [str, ...],            # a list holds aliases, any one is right
     "choices": {"A": str, ...} | [str, ...] | null,   # optional; a list is lettered A, B, ...
     "source": str}

The paper trains on DocQA-RL-1.6K mixed with 1K random MemAgent samples. Both are published as
verl parquet files; convert them to JSONL first (this module reads only JSON/JSONL, stdlib only),
e.g. ``pandas.read_parquet(p).to_json(out, orient="records", lines=True, force_ascii=False)``.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from megatron_longact.data.jsonl import DataFormatError, format_location, read_jsonl, write_jsonl

CHOICE_LETTERS = "ABCDEFGHIJ"
# QwenLong-L1's prompt template wraps the document in <text> tags and ends with this line.
DOCQA_TEXT_OPEN = "<text>"
DOCQA_TEXT_CLOSE = "</text>"
DOCQA_FORMAT_LINE = "Format your response as follows:"

_CORRECT_ANSWER = re.compile(r"The correct answer is \(?([A-J])\)?")
_THE_ANSWER_IS = re.compile(r"the answer is", re.IGNORECASE)


@dataclass(frozen=True)
class RLRecord:
    """One RL prompt: a long context, a question, and the gold answer(s).

    Attributes:
        id: unique within its source.
        context: the long document(s).
        question: the question, including its options for multiple choice when the source
            writes them into the question text.
        answer: the gold answer, or a tuple of aliases.
        choices: letter -> option text when the source lists options separately, else None.
        source: the dataset (or sub-dataset) the record came from.
    """

    id: str
    context: str
    question: str
    answer: str | tuple[str, ...]
    choices: dict[str, str] | None
    source: str

    def to_dict(self) -> dict[str, Any]:
        answer = list(self.answer) if isinstance(self.answer, tuple) else self.answer
        return {
            "id": self.id,
            "context": self.context,
            "question": self.question,
            "answer": answer,
            "choices": self.choices,
            "source": self.source,
        }


# ---------------------------------------------------------------------------------------------
# Reading


def _iter_records(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yields ("<file>:<line>", object) for a JSONL file read line by line (``read_jsonl``), or
    ("<file>: record <i>", object) for a file holding one JSON list. Blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"RL data file {path} does not exist; check the data path")
    with path.open("rb") as f:
        head = f.read(4096).lstrip()
    if not head.startswith(b"["):
        for line_no, obj in read_jsonl(path):
            yield format_location(path, line_no), obj
        return
    with path.open(encoding="utf-8") as f:
        try:
            items = json.load(f)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e
    for i, obj in enumerate(items, start=1):
        where = f"{path}: record {i}"
        if not isinstance(obj, dict):
            raise DataFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        yield where, obj


def _field(obj: Mapping[str, Any], dotted: str, where: str) -> Any:
    """``obj["a"]["b"]`` for "a.b"; a missing or null field raises DataFormatError naming it."""
    node: Any = obj
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or node.get(part) is None:
            raise DataFormatError(f"{where}: missing field '{dotted}'")
        node = node[part]
    return node


def _text(value: Any, name: str, where: str) -> str:
    if not isinstance(value, str):
        raise DataFormatError(
            f"{where}: field '{name}' must be a string, got {type(value).__name__}"
        )
    return value


def _answer(value: Any, name: str, where: str) -> str | tuple[str, ...]:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, list) and value and all(isinstance(v, (str, int, float)) for v in value):
        return str(value[0]) if len(value) == 1 else tuple(map(str, value))
    raise DataFormatError(
        f"{where}: field '{name}' must be a string or a non-empty list of strings, got {value!r}"
    )


def _choices(value: Any, where: str) -> dict[str, str] | None:
    if value is None:
        return None
    if isinstance(value, list):
        if len(value) > len(CHOICE_LETTERS):
            raise DataFormatError(
                f"{where}: field 'choices' has more than {len(CHOICE_LETTERS)} items"
            )
        value = dict(zip(CHOICE_LETTERS, value))
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and k in CHOICE_LETTERS and isinstance(v, str) for k, v in value.items()
    ):
        raise DataFormatError(
            f"{where}: field 'choices' must map letters A, B, ... to option strings, or be a list"
        )
    return dict(value)


def record_from_dict(obj: Mapping[str, Any], *, where: str = "<record>") -> RLRecord:
    """Builds an ``RLRecord`` from our JSON layout; ``where`` ("file:line") goes into errors."""
    return RLRecord(
        id=str(_field(obj, "id", where)),
        context=_text(_field(obj, "context", where), "context", where),
        question=_text(_field(obj, "question", where), "question", where),
        answer=_answer(_field(obj, "answer", where), "answer", where),
        choices=_choices(obj.get("choices"), where),
        source=_text(_field(obj, "source", where), "source", where),
    )


def load_rl_jsonl(path: str | Path) -> list[RLRecord]:
    """Reads our RL records from a JSONL file (or a JSON list); errors name file and line."""
    return [record_from_dict(obj, where=where) for where, obj in _iter_records(path)]


def write_rl_jsonl(records: Sequence[RLRecord], path: str | Path) -> None:
    """Writes records as JSONL (UTF-8, one object per line), the layout ``load_rl_jsonl`` reads."""
    write_jsonl(path, (record.to_dict() for record in records))


# ---------------------------------------------------------------------------------------------
# Source layouts


def _user_content(obj: Mapping[str, Any], where: str) -> str:
    prompt = _field(obj, "prompt", where)
    if not isinstance(prompt, list) or not prompt:
        raise DataFormatError(f"{where}: field 'prompt' must be a non-empty list of chat messages")
    users = [m for m in prompt if isinstance(m, Mapping) and m.get("role") == "user"]
    if not users:
        raise DataFormatError(f"{where}: field 'prompt' has no message with role 'user'")
    return _text(users[-1].get("content"), "prompt[].content", where)


def _strip_answer_wrapper(ground_truth: str) -> str:
    """ "The correct answer is (C)" -> "C"; "Therefore, the answer is 42." -> "42"; else as is."""
    text = ground_truth.replace("*", "").strip()
    match = _CORRECT_ANSWER.search(text)
    if match:
        return match.group(1)
    parts = _THE_ANSWER_IS.split(text)
    if len(parts) >= 2 and parts[-1].strip():
        return parts[-1].strip().rstrip(".").strip()
    return text


def docqa_record(obj: Mapping[str, Any], *, where: str = "<record>") -> RLRecord:
    """Converts one DocQA-RL-1.6K row (Tongyi-Zhiwen/DocQA-RL-1.6K, verl layout) to a record.

    Assumed schema (from the dataset card and QwenLong-L1's reward code)::

        {"data_source": "long_toc_choices_..." | "docmath_..." | "multihoprag_..." | "musique_...",
         "prompt": [{"role": "user", "content": "...<text>\\n{document}\\n</text>\\n\\n{question}"
                                                "\\n\\nFormat your response as follows: ..."}],
         "ability": "doc-mc" | "doc-math" | "doc-qa",
         "reward_model": {"style": "rule", "ground_truth": str},
         "extra_info": {"index": int, ...}}

    The context is the text between ``<text>`` and ``</text>``; the question is what follows
    ``</text>`` up to "Format your response as follows:" (the options of multiple-choice rows
    stay in the question text, ``choices`` is None). The ground truth loses its wrapper
    ("The correct answer is (C)" -> "C", "..., the answer is 42." -> "42"). The id is
    "<data_source>-<extra_info.index>", else the file position.
    """
    source = _text(_field(obj, "data_source", where), "data_source", where)
    content = _user_content(obj, where)
    start, end = content.find(DOCQA_TEXT_OPEN), content.rfind(DOCQA_TEXT_CLOSE)
    if start < 0 or end < start:
        raise DataFormatError(
            f"{where}: field 'prompt[].content' has no <text>...</text> document block; is this "
            "a DocQA-RL-1.6K row? Other layouts need their own converter"
        )
    context = content[start + len(DOCQA_TEXT_OPEN) : end].strip()
    question = content[end + len(DOCQA_TEXT_CLOSE) :]
    if DOCQA_FORMAT_LINE in question:
        question = question[: question.index(DOCQA_FORMAT_LINE)]
    question = question.strip()
    if not question:
        raise DataFormatError(f"{where}: field 'prompt[].content' has no question after </text>")
    ground_truth = _field(obj, "reward_model.ground_truth", where)
    answer = _answer(ground_truth, "reward_model.ground_truth", where)
    if isinstance(answer, str):
        answer = _strip_answer_wrapper(answer)
    extra = obj.get("extra_info") if isinstance(obj.get("extra_info"), dict) else {}
    index = extra.get("index")
    record_id = f"{source}-{index}" if index is not None else where
    return RLRecord(record_id, context, question, answer, None, source)


def memagent_record(obj: Mapping[str, Any], *, where: str = "<record>") -> RLRecord:
    """Converts one MemAgent RL row (BytedTsinghua-SIA/hotpotqa, verl layout) to a record.

    Assumed schema (MemAgent's ``taskutils/memory_data/processing.py``)::

        {"data_source": "hotpotqa",
         "prompt": [{"role": "user", "content": question}],
         "context": "Document 1:\\n...\\n\\nDocument 2:\\n...",
         "ability": "memory",
         "reward_model": {"style": "rule", "ground_truth": [answer, ...]},
         "extra_info": {"index": int, "question": str, "num_docs": int}}

    The question is ``extra_info.question`` when present, else the user message. The simpler
    layout of MemAgent's ``dataset_process.py`` (``{"question", "solution", "context"}``) is
    read too. Gold lists become alias tuples. The id is "<data_source>-<index>", else the file
    position.
    """
    context = _text(_field(obj, "context", where), "context", where)
    if "reward_model" not in obj and "solution" in obj:
        question = _text(_field(obj, "question", where), "question", where)
        answer = _answer(_field(obj, "solution", where), "solution", where)
        return RLRecord(where, context, question, answer, None, "hotpotqa")
    source = str(obj.get("data_source") or "memagent")
    extra = obj.get("extra_info") if isinstance(obj.get("extra_info"), dict) else {}
    question = extra.get("question") or _user_content(obj, where)
    question = _text(question, "extra_info.question", where).strip()
    ground_truth = _field(obj, "reward_model.ground_truth", where)
    answer = _answer(ground_truth, "reward_model.ground_truth", where)
    index = extra.get("index")
    record_id = f"{source}-{index}" if index is not None else where
    return RLRecord(record_id, context, question, answer, None, source)


def load_docqa_rl(path: str | Path) -> list[RLRecord]:
    """Reads a DocQA-RL-1.6K JSONL/JSON export (see ``docqa_record``)."""
    return [docqa_record(obj, where=where) for where, obj in _iter_records(path)]


def load_memagent_rl(path: str | Path) -> list[RLRecord]:
    """Reads a MemAgent RL JSONL/JSON export (see ``memagent_record``)."""
    return [memagent_record(obj, where=where) for where, obj in _iter_records(path)]


# ---------------------------------------------------------------------------------------------
# Mixing and truncation


def mix_datasets(
    datasets: Mapping[str, Sequence[Any]],
    ratios: Mapping[str, float],
    *,
    num_samples: int,
    seed: int,
) -> list[Any]:
    """Draws ``num_samples`` items from several datasets in the given proportions, shuffled.

    Counts: ratios are normalized to sum 1; dataset d gets floor(num_samples * p_d) items and
    the remainder goes one each to the largest fractional parts (ties by name). A dataset
    draws without replacement while it can; a count beyond its size takes whole shuffled
    passes plus a partial one. The same seed gives the same list.

    Args:
        datasets: name -> items (records or anything).
        ratios: name -> non-negative weight; every name must be in ``datasets``.
        num_samples: the total to draw.
        seed: seeds a private ``random.Random``.
    """
    unknown = sorted(set(ratios) - set(datasets))
    if unknown:
        raise ValueError(f"ratios name unknown datasets {unknown}; known: {sorted(datasets)}")
    if num_samples < 0 or any(r < 0 for r in ratios.values()):
        raise ValueError("num_samples and every ratio must be non-negative")
    total = sum(ratios.values())
    if total <= 0:
        raise ValueError(f"ratios {dict(ratios)} sum to 0; give at least one positive ratio")
    names = sorted(ratios)
    exact = {name: num_samples * ratios[name] / total for name in names}
    counts = {name: int(exact[name]) for name in names}
    leftover = num_samples - sum(counts.values())
    by_fraction = sorted(names, key=lambda n: (-(exact[n] - counts[n]), n))
    for name in by_fraction[:leftover]:
        counts[name] += 1

    rng = random.Random(seed)
    mixed: list[Any] = []
    for name in names:
        items, count = list(datasets[name]), counts[name]
        if count and not items:
            raise ValueError(f"dataset '{name}' is empty but its ratio asks for {count} items")
        while count > 0:
            order = list(range(len(items)))
            rng.shuffle(order)
            mixed.extend(items[i] for i in order[:count])
            count -= min(count, len(items))
    rng.shuffle(mixed)
    return mixed


def truncate_middle(token_ids: Sequence[int], max_tokens: int) -> list[int]:
    """Keeps the first floor(max/2) and last ceil(max/2) tokens when longer than ``max_tokens``.

    LongBench v2's middle truncation (``ids[:n//2] + ids[-n//2:]``, the tail gets the odd
    token), the same rule as ``eval.tokens.truncate_middle``; the result has ``max_tokens``.
    """
    if max_tokens < 0:
        raise ValueError(f"max_tokens={max_tokens} must be non-negative")
    ids = list(token_ids)
    if len(ids) <= max_tokens:
        return ids
    head = max_tokens // 2
    return ids[:head] + ids[len(ids) - (max_tokens - head) :]


class Tokenizer(Protocol):
    """The slice of a Hugging Face tokenizer that ``truncate_middle_text`` uses."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


def truncate_middle_text(text: str, tokenizer: Tokenizer, max_tokens: int) -> str:
    """Middle-truncates ``text`` to at most ``max_tokens`` tokens of ``tokenizer``.

    Text that fits is returned unchanged; otherwise the decoded head and tail are joined, as
    LongBench does (the join may re-tokenize to a token more or less).
    """
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) <= max_tokens:
        return text
    head = max_tokens // 2
    head_text = tokenizer.decode(ids[:head], skip_special_tokens=True)
    tail_text = tokenizer.decode(ids[len(ids) - (max_tokens - head) :], skip_special_tokens=True)
    return head_text + tail_text
