"""Held-out synthetic key-value retrieval (the quickstart task) as an evaluation suite.

A NIAH-style task: the document holds several "The code of <key> is <value>." facts and the
question asks for one value. Samples are RL JSONL records (``longact data`` writes
``rl_val.jsonl``); the prompt is the one the model was trained with; the score is 1 when the
``<answer>`` block (or, failing that, the text after the last ``</think>``) holds the value.
"""

from __future__ import annotations

import re
from pathlib import Path

from megatron_longact.data.rl_data import RLRecord, load_rl_jsonl
from megatron_longact.data.synthetic import format_prompt
from megatron_longact.eval.metrics import strip_thinking
from megatron_longact.eval.suite import Record, Suite, mean_percent

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
COLUMNS = ("KV-Acc", "KV-Format")


def load_synthetic_kv(path: str | Path) -> list[RLRecord]:
    """Records from an RL data file (JSONL, parquet or an HF folder; errors name the file, the
    line or row and the field)."""
    return load_rl_jsonl(path)


def extract_answer(response: str) -> str:
    """The last ``<answer>`` block, else the text after the last ``</think>``; stripped."""
    found = _ANSWER.findall(response)
    return (found[-1] if found else strip_thinking(response)).strip()


def score_sample(record: RLRecord, response: str) -> Record:
    gold = record.answer if isinstance(record.answer, str) else record.answer[0]
    return {
        "id": record.id,
        "correct": float(extract_answer(response) == gold),
        "formatted": float(bool(_ANSWER.search(response)) and "</think>" in response),
    }


def aggregate(records: list[Record]) -> dict[str, float]:
    return {
        "KV-Acc": mean_percent([r["correct"] for r in records]),
        "KV-Format": mean_percent([r["formatted"] for r in records]),
    }


def make_suite(name: str = "synthetic_kv") -> Suite[RLRecord]:
    return Suite(
        name=name,
        sample_id=lambda r: r.id,
        build_prompt=lambda r: format_prompt(r.context, r.question),
        score_sample=score_sample,
        aggregate=aggregate,
    )
