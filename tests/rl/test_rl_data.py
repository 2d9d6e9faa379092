"""RL records: our JSONL layout, DocQA-RL-1.6K and MemAgent converters, mixing, truncation."""

import json
from collections import Counter

import pytest

from megatron_longact.data.jsonl import DataFormatError
from megatron_longact.data.rl_data import (
    RLRecord,
    load_docqa_rl,
    load_memagent_rl,
    load_rl_jsonl,
    mix_datasets,
    truncate_middle,
    truncate_middle_text,
    write_rl_jsonl,
)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _docqa_prompt(doc, question):
    return (
        "Please read the following text and answer the question below.\n\n"
        f"<text>\n{doc}\n</text>\n\n{question}\n\n"
        'Format your response as follows: "Therefore, the answer is (insert answer here)".'
    )


def _docqa_row(source, doc, question, ground_truth, index):
    return {
        "data_source": source,
        "prompt": [{"role": "user", "content": _docqa_prompt(doc, question)}],
        "ability": "doc-qa",
        "reward_model": {"style": "rule", "ground_truth": ground_truth},
        "extra_info": {"index": index},
    }


# ------------------------------------------------------------------------------ our layout


def test_round_trip_and_choice_list(tmp_path):
    records = [
        RLRecord("q1", "ctx", "Who?", ("Ann", "Anne"), None, "toy"),
        RLRecord("q2", "ctx2", "Which?", "B", {"A": "x", "B": "y"}, "toy"),
    ]
    path = tmp_path / "rl.jsonl"
    write_rl_jsonl(records, path)
    assert load_rl_jsonl(path) == records
    # A list of choices is lettered A, B, ...; a one-element answer list becomes a string.
    row = {"id": 3, "context": "c", "question": "q", "answer": ["x"], "choices": ["p", "q"]}
    _write_jsonl(path, [{**row, "source": "s"}])
    (rec,) = load_rl_jsonl(path)
    assert (rec.id, rec.answer, rec.choices) == ("3", "x", {"A": "p", "B": "q"})


def test_errors_name_file_line_and_field(tmp_path):
    good = {"id": "1", "context": "c", "question": "q", "answer": "a", "source": "s"}
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + '{"id": "2", "context": \n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:3: malformed JSON"):
        load_rl_jsonl(path)
    missing = {k: v for k, v in good.items() if k != "question"}
    _write_jsonl(path, [good, missing])
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:2: missing field 'question'"):
        load_rl_jsonl(path)
    _write_jsonl(path, [{**good, "answer": []}])
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:1: field 'answer'"):
        load_rl_jsonl(path)
    _write_jsonl(path, [{**good, "choices": {"Z": "x"}}])
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:1: field 'choices'"):
        load_rl_jsonl(path)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_rl_jsonl(tmp_path / "nope.jsonl")


# ----------------------------------------------------------------------------- DocQA-RL-1.6K


def test_docqa_conversion(tmp_path):
    rows = [
        _docqa_row(
            "long_toc_choices_0_20000",
            "Chapter 1 ...",
            "Which chapter?\nA. one\nB. two",
            "The correct answer is (B)",
            7,
        ),
        _docqa_row(
            "docmath_v1", "Revenue 1,200", "What is it?", "Therefore, the answer is 1200.", 8
        ),
        _docqa_row("musique_v1", "Doc 1: ...", "Where was he born?", "Oslo", 9),
    ]
    path = _write_jsonl(tmp_path / "docqa.jsonl", rows)
    mc, math_rec, qa = load_docqa_rl(path)
    assert mc == RLRecord(
        id="long_toc_choices_0_20000-7",
        context="Chapter 1 ...",
        question="Which chapter?",
        answer="B",
        choices={"A": "one", "B": "two"},
        source="long_toc_choices_0_20000",
    )
    assert (math_rec.answer, math_rec.question) == ("1200", "What is it?")
    assert (qa.answer, qa.context, qa.id) == ("Oslo", "Doc 1: ...", "musique_v1-9")


def test_docqa_errors(tmp_path):
    row = _docqa_row("musique_v1", "doc", "q?", "x", 1)
    row["prompt"][0]["content"] = "no document block here"
    path = _write_jsonl(tmp_path / "docqa.jsonl", [_docqa_row("m", "d", "q?", "x", 0), row])
    with pytest.raises(DataFormatError, match=r"docqa\.jsonl:2: .*<text>"):
        load_docqa_rl(path)
    del row["reward_model"]
    row["prompt"][0]["content"] = _docqa_prompt("d", "q?")
    _write_jsonl(path, [row])
    with pytest.raises(DataFormatError, match=r"docqa\.jsonl:1: missing field 'reward_model"):
        load_docqa_rl(path)


# --------------------------------------------------------------------------------- MemAgent


def test_memagent_conversion_jsonl_and_json_list(tmp_path):
    verl_row = {
        "data_source": "hotpotqa",
        "prompt": [{"role": "user", "content": "Who wrote it?"}],
        "context": "Document 1:\nA book by X.",
        "ability": "memory",
        "reward_model": {"style": "rule", "ground_truth": ["X", "Mr. X"]},
        "extra_info": {"index": 4, "question": "Who wrote it?", "num_docs": 200},
    }
    simple_row = {"question": "When?", "solution": ["1990"], "context": "Document 1:\n1990."}
    path = _write_jsonl(tmp_path / "mem.jsonl", [verl_row, simple_row])
    first, second = load_memagent_rl(path)
    assert first == RLRecord(
        "hotpotqa-4", "Document 1:\nA book by X.", "Who wrote it?", ("X", "Mr. X"), None, "hotpotqa"
    )
    assert (second.question, second.answer, second.id) == ("When?", "1990", f"{path}:2")
    # The same rows as one JSON list (a parquet export with orient="records").
    json_path = tmp_path / "mem.json"
    json_path.write_text(json.dumps([verl_row]), encoding="utf-8")
    assert load_memagent_rl(json_path) == [first]
    bad = dict(verl_row)
    del bad["context"]
    json_path.write_text(json.dumps([verl_row, bad]), encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"mem\.json: row 1: missing field 'context'"):
        load_memagent_rl(json_path)


# ------------------------------------------------------------------------------------ mixing


def test_mix_datasets_counts_and_determinism():
    docqa = [f"d{i}" for i in range(16)]
    mem = [f"m{i}" for i in range(100)]
    # 26 samples at 16:10 -> exactly 16 and 10; DocQA drawn without replacement (all of it).
    mixed = mix_datasets(
        {"docqa": docqa, "mem": mem}, {"docqa": 16, "mem": 10}, num_samples=26, seed=0
    )
    counts = Counter(item[0] for item in mixed)
    assert counts == {"d": 16, "m": 10}
    assert sorted(i for i in mixed if i[0] == "d") == sorted(docqa)
    assert len(set(mixed)) == 26
    again = mix_datasets(
        {"docqa": docqa, "mem": mem}, {"docqa": 16, "mem": 10}, num_samples=26, seed=0
    )
    other = mix_datasets(
        {"docqa": docqa, "mem": mem}, {"docqa": 16, "mem": 10}, num_samples=26, seed=1
    )
    assert mixed == again and mixed != other
    # Remainders: 10 at 1:1:1 -> 3.33 each; the leftover 1 goes to the first name by order.
    three = mix_datasets(
        {"a": ["a"] * 9, "b": ["b"] * 9, "c": ["c"] * 9},
        {"a": 1, "b": 1, "c": 1},
        num_samples=10,
        seed=0,
    )
    assert Counter(three) == {"a": 4, "b": 3, "c": 3}
    # Oversampling a small dataset takes whole passes: 5 from 2 items -> each twice, one thrice.
    over = Counter(mix_datasets({"s": ["x", "y"]}, {"s": 1.0}, num_samples=5, seed=3))
    assert sorted(over.values()) == [2, 3]


def test_mix_datasets_errors():
    with pytest.raises(ValueError, match="unknown datasets"):
        mix_datasets({"a": [1]}, {"b": 1.0}, num_samples=1, seed=0)
    with pytest.raises(ValueError, match="sum to 0"):
        mix_datasets({"a": [1]}, {"a": 0.0}, num_samples=1, seed=0)
    with pytest.raises(ValueError, match="empty"):
        mix_datasets({"a": []}, {"a": 1.0}, num_samples=1, seed=0)


# -------------------------------------------------------------------------------- truncation


def test_truncate_middle():
    ids = list(range(10))
    assert truncate_middle(ids, 20) == ids
    assert truncate_middle(ids, 4) == [0, 1, 8, 9]
    assert truncate_middle(ids, 5) == [0, 1, 7, 8, 9]  # odd: the tail gets the extra token
    assert truncate_middle(ids, 1) == [9]
    assert truncate_middle(ids, 0) == []
    with pytest.raises(ValueError, match="non-negative"):
        truncate_middle(ids, -1)


class CharTokenizer:
    """One token per character: enough to check the text-level helper."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_truncate_middle_text():
    tok = CharTokenizer()
    assert truncate_middle_text("abcdefghij", tok, 4) == "abij"
    assert truncate_middle_text("abcdefghij", tok, 3) == "aij"
    assert truncate_middle_text("short", tok, 10) == "short"
