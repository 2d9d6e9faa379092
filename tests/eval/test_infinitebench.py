"""InfiniteBench: official per-task scorers, loader errors, templates and Table 3 aggregation."""

from __future__ import annotations

import json

import pytest

from megatron_longact.eval.infinitebench import (
    TABLE3_COLUMNS,
    InfiniteBenchSample,
    aggregate,
    build_prompt,
    load_infinitebench,
    score_choice,
    score_prediction,
    score_sample,
)
from megatron_longact.eval.metrics import rouge_lsum

LABEL_B = ("the red fox", "B")


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("B", 1.0),  # leading letter decides
        ("C. the red fox", 0.0),  # leading letter decides even against the text
        ("A cat would say D", 0.0),  # official quirk: the leading 'A' is read as the choice
        ("The answer is: B", 1.0),  # prefix "answer is:" then the letter
        ("I think the answer: the red fox, surely", 1.0),  # prefix then the option text
        ("so the answer is C", 0.0),
        ("Probably B, maybe", 1.0),  # first standalone letter word
        ("no letter here", 0.0),
        ("", 0.0),
        ("the red fox", 1.0),  # exactly the option text: official `if pred in label`
        ("  the red fox\n", 1.0),  # ... after the official strip
        ("the red fox.", 0.0),  # not equal, no prefix, no letter word
    ],
)
def test_choice_scorer_follows_the_official_rules(prediction, expected):
    assert score_choice(prediction, LABEL_B) == expected


def test_choice_scorer_option_text_equals_label():
    # The case (compute_scores.py:254): "Paris" against ["Paris", "B"] scores 1.
    assert score_choice("Paris", ("Paris", "B")) == 1.0
    sample = InfiniteBenchSample("longbook_choice_eng", "0", "ctx", "q?", ("Paris", "B"),
                                 ("Rome", "Paris", "Oslo", "Bern"))  # fmt: skip
    assert score_sample(sample, "<think>hmm</think>\nParis")["score"] == 1.0
    # Official quirk kept: an option text starting with A-D is read as that letter.
    assert score_choice("Bern", ("Bern", "D")) == 0.0


def test_retrieval_scores_compare_the_first_integer():
    assert score_prediction("passkey", "The pass key is 71432.", ("71432",)) == 1.0
    assert score_prediction("passkey", "71432 or 5", ("5",)) == 0.0
    assert score_prediction("number_string", "digits: 0012345", ("0012345",)) == 1.0


def test_qa_and_summary_scores():
    assert score_prediction(
        "longbook_qa_eng", "The red fox.", ("red fox", "a fox")
    ) == pytest.approx(1.0)
    assert score_prediction("longbook_qa_chn", "北京市", ("北京",)) == pytest.approx(0.8)
    summary, reference = "the fox ran\nit hid", "a fox ran away\nthe fox hid"
    assert score_prediction("longbook_sum_eng", summary, (reference,)) == pytest.approx(
        rouge_lsum(summary, reference)
    )
    with pytest.raises(ValueError, match="unknown InfiniteBench task"):
        score_prediction("kv_retrieval", "x", ("x",))


def test_score_sample_drops_reasoning_and_whitespace():
    sample = InfiniteBenchSample(
        task="longbook_choice_eng", id="0", context="", input="", answer=LABEL_B
    )
    assert score_sample(sample, "<think>maybe A</think>\n\nB")["score"] == 1.0


def test_templates_fill_question_options_and_context():
    sample = InfiniteBenchSample(
        task="longbook_choice_eng",
        id="7",
        context="BOOK",
        input="Who ran?",
        answer=LABEL_B,
        options=("a cat", "the red fox", "a dog", "a cow"),
    )
    chat = build_prompt(sample)
    assert chat.startswith(
        "Read the book and answer the question.\n\nBOOK\n\nQuestion: Who ran?\n\n"
    )
    assert chat.endswith("A. a cat\nB. the red fox\nC. a dog\nD. a cow")
    assert build_prompt(sample, templates="base").endswith("The letter of the correct answer is")
    passkey = InfiniteBenchSample(
        task="passkey", id="0", context="noise", input="What is the pass key?", answer=("1",)
    )
    assert build_prompt(passkey, templates="base").endswith(
        "noise\n\nWhat is the pass key?\n\nThe pass key is"
    )


def test_aggregate_gives_table3_columns_and_average():
    records = [
        {"task": "passkey", "score": 1.0},
        {"task": "passkey", "score": 0.0},
        {"task": "number_string", "score": 1.0},
        {"task": "longbook_sum_eng", "score": 0.2},
        {"task": "longbook_qa_eng", "score": 0.4},
        {"task": "longbook_qa_chn", "score": 0.1},
        {"task": "longbook_choice_eng", "score": 1.0},
    ]
    scores = aggregate(records)
    assert list(scores) == list(TABLE3_COLUMNS)
    assert (
        scores["Re.Pa"] == 50.0
        and scores["Re.Nu"] == 100.0
        and scores["En.Sum"] == pytest.approx(20.0)
    )
    assert scores["Avg."] == pytest.approx((50 + 100 + 20 + 40 + 10 + 100) / 6)


def _write_jsonl(path, records):
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8"
    )


def test_loader_reads_official_files_and_maps_choice_answers(tmp_path):
    _write_jsonl(
        tmp_path / "passkey.jsonl",
        [{"id": 0, "context": "c", "input": "q", "answer": ["71432"], "options": []}],
    )
    _write_jsonl(
        tmp_path / "longbook_choice_eng.jsonl",
        [
            {
                "id": 3,
                "context": "c",
                "input": "q",
                "answer": ["a dog"],
                "options": ["a cat", "a fox", "a dog", "a cow"],
            }
        ],
    )
    samples = load_infinitebench(tmp_path, tasks=("passkey", "longbook_choice_eng"))
    assert samples[0].answer == ("71432",) and samples[0].task == "passkey"
    assert samples[1].answer == ("a dog", "C")  # official get_answer: [text, letter]


def test_loader_errors_name_the_file_line_and_field(tmp_path):
    _write_jsonl(
        tmp_path / "passkey.jsonl",
        [
            {"id": 0, "context": "c", "input": "q", "answer": ["1"]},
            {"id": 1, "input": "q", "answer": ["2"]},
        ],
    )
    with pytest.raises(ValueError) as err:
        load_infinitebench(tmp_path, tasks=("passkey",))
    assert (
        "passkey.jsonl" in str(err.value)
        and "passkey.jsonl:2:" in str(err.value)
        and "'context'" in str(err.value)
    )
    with pytest.raises(FileNotFoundError, match="number_string.jsonl"):
        load_infinitebench(tmp_path, tasks=("number_string",))
    _write_jsonl(
        tmp_path / "longbook_choice_eng.jsonl",
        [
            {
                "id": 0,
                "context": "c",
                "input": "q",
                "answer": ["zebra"],
                "options": ["a", "b", "c", "d"],
            }
        ],
    )
    with pytest.raises(ValueError, match="'answer'"):
        load_infinitebench(tmp_path, tasks=("longbook_choice_eng",))
