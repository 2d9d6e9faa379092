"""RL prompt records, loaders for the paper's two sources, mixing, and middle truncation.

Our record (one row of a JSONL, JSON-list or parquet file, or of a Hugging Face dataset folder;
``records.read_records`` reads them all)::

    {"id": str, "context": str, "question": str,
     "answer": str | [str, ...],            # a list holds aliases, any one is right
     "choices": {"A": str, ...} | [str, ...] | null,   # optional; a list is lettered A, B, ...
     "source": str}

The paper trains on DocQA-RL-1.6K mixed with 1K random MemAgent samples. Both are published as
verl parquet files and are read as they are (``load_docqa_rl``, ``load_memagent_rl``); see
docs/data.md for the layouts and the prompt each answer type gets.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from megatron_longact.data.jsonl import DataFormatError, write_jsonl
from megatron_longact.data.records import read_records
from megatron_longact.errors import UserError

CHOICE_LETTERS = "ABCDEFGHIJ"
# QwenLong-L1's prompt template wraps the document in <text> tags and ends with this line.
DOCQA_TEXT_OPEN = "<text>"
DOCQA_TEXT_CLOSE = "</text>"
DOCQA_FORMAT_LINE = "Format your response as follows:"

# An option line of a multiple-choice question: "(A) text", "A. text", "A) text" or "A: text".
_OPTION_LINE = re.compile(r"^\s*(?:\(([A-J])\)|([A-J])[.):])\s*(.*?)\s*$")
_CHOICES_HEADER = "Choices:"
# LongBench v2's question lead-in, which DocQA-RL's long_toc_choices rows reuse.
_MC_LEAD_IN = "What is the correct answer to this question:"
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
    """Yields (location, row) of any data file or folder (``records.read_records``)."""
    yield from read_records(path)


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
    if isinstance(value, dict):
        # A parquet/Arrow struct column holds every letter any row uses: absent ones are null.
        value = {k: v for k, v in value.items() if v is not None}
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
    """Reads our RL records from any data file or folder; errors name the file, line or row."""
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


def split_choices(question: str) -> tuple[str, dict[str, str] | None]:
    """Splits trailing option lines off a question: ``(stem, {"A": text, ...})``.

    The options are the last run of lines lettered A, B, C, ... in order ("(A) x", "A. x",
    "A) x", "A: x"), at least two; a "Choices:" line before them and LongBench v2's lead-in
    "What is the correct answer to this question:" are dropped from the stem. A question
    without such a run comes back unchanged with None.
    """
    lines = question.strip().splitlines()
    end = len(lines)
    while end and not lines[end - 1].strip():
        end -= 1
    start, letters = end, []
    while start > 0:
        match = _OPTION_LINE.match(lines[start - 1])
        if match is None:
            break
        letters.insert(0, (match.group(1) or match.group(2), match.group(3)))
        start -= 1
    # Keep the run from its last "A" on, and only when it is lettered A, B, C, ... in order.
    first_a = next((i for i in range(len(letters) - 1, -1, -1) if letters[i][0] == "A"), None)
    if first_a is None:
        return question, None
    start += first_a
    letters = letters[first_a:]
    if len(letters) < 2 or [k for k, _ in letters] != list(CHOICE_LETTERS[: len(letters)]):
        return question, None
    stem_lines = lines[:start]
    if stem_lines and stem_lines[-1].strip() == _CHOICES_HEADER:
        stem_lines = stem_lines[:-1]
    stem = "\n".join(stem_lines).strip()
    if stem.startswith(_MC_LEAD_IN):
        stem = stem[len(_MC_LEAD_IN) :].strip()
    return stem, dict(letters)


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
    ``</text>`` up to "Format your response as follows:". Multiple-choice rows (a gold letter)
    have their option lines split off into ``choices`` (:func:`split_choices`), so the prompt
    lists them and the reward compares letters. The ground truth loses its wrapper
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
    choices = None
    if isinstance(answer, str) and len(answer) == 1 and answer in CHOICE_LETTERS:
        stem, choices = split_choices(question)
        if choices is not None and answer in choices:
            question = stem
        else:
            choices = None  # options not found as lines: they stay in the question text
    extra = obj.get("extra_info") if isinstance(obj.get("extra_info"), dict) else {}
    index = extra.get("index")
    record_id = f"{source}-{index}" if index is not None else where
    return RLRecord(record_id, context, question, answer, choices, source)


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
    """Reads DocQA-RL-1.6K as published (parquet) or exported (JSONL, HF folder); see ``docqa_record``."""
    return [docqa_record(obj, where=where) for where, obj in _iter_records(path)]


def load_memagent_rl(path: str | Path) -> list[RLRecord]:
    """Reads MemAgent's RL data as published (parquet) or exported; see ``memagent_record``."""
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
        raise UserError(f"ratios name unknown datasets {unknown}; known: {sorted(datasets)}")
    if num_samples < 0 or any(r < 0 for r in ratios.values()):
        raise UserError("num_samples and every ratio must be non-negative")
    total = sum(ratios.values())
    if total <= 0:
        raise UserError(f"ratios {dict(ratios)} sum to 0; give at least one positive ratio")
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
            raise UserError(f"dataset '{name}' is empty but its ratio asks for {count} items")
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
