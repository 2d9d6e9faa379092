"""LongBench v2: loader errors, official prompts, regex extraction, Table 1 aggregation."""

from __future__ import annotations

import json

import pytest

from megatron_longact.eval.longbench_v2 import (
    FIELDS,
    TABLE1_COLUMNS,
    LongBenchV2Sample,
    aggregate,
    build_cot_answer_prompt,
    build_prompt,
    extract_choice,
    load_longbench_v2,
    make_suite,
    score_sample,
)


def _record(i: int, **overrides: str) -> dict[str, str]:
    record = {
        "_id": f"id{i}",
        "domain": "Single-Document QA",
        "sub_domain": "Academic",
        "difficulty": "easy",
        "length": "short",
        "question": f" Question {i}? ",
        "choice_A": "alpha",
        "choice_B": "beta",
        "choice_C": "gamma",
        "choice_D": "delta",
        "answer": "B",
        "context": " word " * 30,
    }
    record.update(overrides)
    return record


def _sample(**overrides: str) -> LongBenchV2Sample:
    return LongBenchV2Sample(**_record(0, **overrides))


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("The correct answer is (B)", "B"),
        ("**The correct answer is (C)**", "C"),  # '*' removed first
        ("The correct answer is D.", "D"),  # second regex
        ("The correct answer is: A", None),  # neither regex allows a colon
        ("the correct answer is (B)", None),  # case-sensitive, as pred.py
        ("The correct answer is (A). Wait. The correct answer is (B)", "A"),  # first match
        ("<think>The correct answer is (A)</think>The correct answer is (B)", "B"),
        ("<answer>C</answer>", "C"),
        ("<answer> (D) the fourth one</answer>", "D"),
        ("<answer>B.</answer> and later <answer>A</answer>", "A"),  # last tag
        ("<answer>Paris</answer>", None),
        ("I cannot decide.", None),
    ],
)
def test_extract_choice_follows_official_regexes_then_answer_tag(response, expected):
    assert extract_choice(response) == expected


def test_tag_first_prefers_the_answer_tag():
    response = "The correct answer is (A). <answer>B</answer>"
    assert extract_choice(response) == "A"
    assert extract_choice(response, tag_first=True) == "B"


def test_official_prompt_substitutes_stripped_fields():
    prompt = build_prompt(_sample(context="  the doc  "), style="0shot")
    assert prompt.startswith(
        "Please read the following text and answer the question below.\n\n<text>\nthe doc\n</text>"
    )
    assert (
        "What is the correct answer to this question: Question 0?\nChoices:\n(A) alpha\n(B) beta\n"
        in prompt
    )
    assert prompt.endswith(
        'Format your response as follows: "The correct answer is (insert answer here)".'
    )


def test_cot_prompts_are_two_turns_without_the_document_in_the_second():
    first = build_prompt(_sample(context="the doc"), style="cot")
    assert first.endswith("(D) delta\n\nLet’s think step by step:")
    second = build_cot_answer_prompt(_sample(context="the doc"), " because beta ")
    assert "the doc" not in second and "The text is too long and omitted here." in second
    assert "Let’s think step by step: because beta\n\nBased on the above" in second


def test_prompt_is_middle_truncated_to_the_budget(ws_codec):
    sample = _sample(context=" ".join(f"w{i}" for i in range(1000)))
    full = build_prompt(sample)
    cut = build_prompt(sample, max_prompt_tokens=100, codec=ws_codec)
    assert ws_codec.count(full) > 1000 and ws_codec.count(cut) == 100
    assert cut.split()[:50] == full.split()[:50] and cut.split()[-50:] == full.split()[-50:]


def test_aggregate_gives_table1_columns():
    samples = [
        _sample(difficulty="easy", length="short", answer="A"),
        _sample(difficulty="easy", length="medium", answer="B"),
        _sample(difficulty="hard", length="long", answer="C"),
        _sample(difficulty="hard", length="long", answer="D"),
    ]
    responses = [
        "The correct answer is (A)",
        "The correct answer is (C)",
        "The correct answer is C",
        "no idea",
    ]
    records = [score_sample(s, r) for s, r in zip(samples, responses)]
    scores = aggregate(records)
    assert {c: scores[c] for c in TABLE1_COLUMNS} == {
        "Overall": 50.0,
        "Easy": 50.0,
        "Hard": 50.0,
        "Short": 100.0,
        "Medium": 0.0,
        "Long": 50.0,
    }
    assert scores["num_unparsed"] == 1.0
    # result.py's `compensated`: an unparsed answer earns 1/4
    assert aggregate(records, compensated=True)["Overall"] == pytest.approx(100 * 2.25 / 4)


def test_loader_reads_json_list_and_jsonl(tmp_path):
    records = [_record(0), _record(1, difficulty="hard", length="long")]
    json_path = tmp_path / "data.json"
    json_path.write_text(json.dumps(records), encoding="utf-8")
    jsonl_path = tmp_path / "data.jsonl"
    jsonl_path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    for path in (json_path, jsonl_path):
        samples = load_longbench_v2(path)
        assert [s._id for s in samples] == ["id0", "id1"]
        assert samples[1].difficulty == "hard" and samples[1].length == "long"


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_loader_names_file_record_and_field_on_a_missing_field(tmp_path, suffix):
    bad = _record(1)
    del bad["question"]
    path = tmp_path / f"data{suffix}"
    records = [_record(0), bad]
    path.write_text(
        json.dumps(records) if suffix == ".json" else "\n".join(json.dumps(r) for r in records),
        encoding="utf-8",
    )
    with pytest.raises(ValueError) as err:
        load_longbench_v2(path)
    message = str(err.value)
    assert (
        str(path) in message
        and ("row 1" in message if suffix == ".json" else f"{path}:2" in message)
        and "id1" in message
        and "'question'" in message
    )


def test_loader_rejects_bad_values_and_missing_files(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([_record(0, answer="E")]), encoding="utf-8")
    with pytest.raises(ValueError, match="'answer'"):
        load_longbench_v2(path)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_longbench_v2(tmp_path / "missing.json")
    assert len(FIELDS) == 12


def test_make_suite_needs_a_tokenizer_for_a_budget():
    with pytest.raises(ValueError, match="tokenizer"):
        make_suite(max_prompt_tokens=1000)
    suite = make_suite(style="answer_tag", max_prompt_tokens=None)
    sample = _sample()
    assert "<answer></answer>" in suite.build_prompt(sample)
    assert (
        suite.score_sample(sample, "The correct answer is (A) <answer>B</answer>")["judge"] is True
    )


def test_templates_are_the_official_prompt_files_byte_for_byte():
    from pathlib import Path

    from megatron_longact.eval import longbench_v2

    folder = Path(__file__).parent / "fixtures" / "longbench_v2_prompts"  # THUDM/LongBench 2e00731
    for name, template in (("0shot", longbench_v2.TEMPLATE_0SHOT),
                           ("0shot_cot", longbench_v2.TEMPLATE_0SHOT_COT),
                           ("0shot_cot_ans", longbench_v2.TEMPLATE_0SHOT_COT_ANS)):  # fmt: skip
        assert (folder / f"{name}.txt").read_text(encoding="utf-8") == template, name
