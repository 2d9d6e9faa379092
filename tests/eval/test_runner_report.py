"""Runner: per-batch persistence, resume after a crash, CoT follow-ups; report tables."""

from __future__ import annotations

import csv
import io
import json

import pytest

from megatron_longact.eval import longbench_v2
from megatron_longact.eval.longbench_v2 import LongBenchV2Sample
from megatron_longact.eval.report import (
    INFINITEBENCH_TABLE,
    LONGBENCH_V2_TABLE,
    load_scores,
    render_markdown,
    ruler_row,
    ruler_table,
    write_report,
)
from megatron_longact.eval.runner import evaluate, predictions_path, read_predictions, scores_path


def _samples(n: int) -> list[LongBenchV2Sample]:
    return [
        LongBenchV2Sample(
            _id=f"q{i}",
            domain="d",
            sub_domain="s",
            difficulty="easy" if i % 2 == 0 else "hard",
            length=("short", "medium", "long")[i % 3],
            question=f"Q{i}",
            choice_A="a",
            choice_B="b",
            choice_C="c",
            choice_D="d",
            answer="ABCD"[i % 4],
            context=f"doc {i}",
        )
        for i in range(n)
    ]


def _oracle(prompts: list[str]) -> list[str]:
    """Answers correctly from the question number in the prompt (Q{i} has answer ABCD[i % 4])."""
    out = []
    for p in prompts:
        i = int(p.split("question: Q")[1].split("\n")[0])
        out.append(f"The correct answer is ({'ABCD'[i % 4]})")
    return out


def test_evaluate_writes_predictions_and_scores(tmp_path):
    suite = longbench_v2.make_suite(max_prompt_tokens=None)
    scores = evaluate(
        suite, _samples(10), _oracle, out_dir=tmp_path, batch_size=3, show_progress=False
    )
    assert scores["Overall"] == 100.0 and scores["num_samples"] == 10.0
    records = read_predictions(predictions_path(tmp_path, suite.name))
    assert [r["id"] for r in records] == [f"q{i}" for i in range(10)]
    assert records[0]["pred"] == "A" and records[0]["response"] == "The correct answer is (A)"
    assert load_scores(scores_path(tmp_path, suite.name)) == scores


def test_resume_regenerates_what_another_rank_lacks(tmp_path):
    """``done_everywhere`` (the ranks' common finished ids) decides what is left: a sample
    this rank has but another lacks is generated again, and its new record wins."""
    suite = longbench_v2.make_suite(max_prompt_tokens=None)
    evaluate(suite, _samples(4), _oracle, out_dir=tmp_path, batch_size=2, show_progress=False)
    asked: list[str] = []

    def recording(prompts: list[str]) -> list[str]:
        asked.extend(prompts)
        return _oracle(prompts)

    others_have = {"q0", "q1", "q2"}
    scores = evaluate(suite, _samples(4), recording, out_dir=tmp_path, batch_size=2,
                      show_progress=False, done_everywhere=lambda mine: mine & others_have)  # fmt: skip
    assert len(asked) == 1 and "question: Q3" in asked[0]
    assert scores["Overall"] == 100.0 and scores["num_samples"] == 4.0


def test_a_crash_loses_only_the_batch_in_flight_and_resume_finishes(tmp_path):
    suite = longbench_v2.make_suite(max_prompt_tokens=None)
    calls = []

    def crashing(prompts):
        calls.append(len(prompts))
        if len(calls) == 3:
            raise RuntimeError("backend died")
        return _oracle(prompts)

    with pytest.raises(RuntimeError, match="backend died"):
        evaluate(suite, _samples(10), crashing, out_dir=tmp_path, batch_size=4, show_progress=False)
    path = predictions_path(tmp_path, suite.name)
    assert len(read_predictions(path)) == 8  # two full batches were flushed
    # a write torn by the crash is dropped and cut from the file
    with path.open("a", encoding="utf-8") as f:
        f.write('{"id": "q9", "pred": ')
    seen = []

    def counting(prompts):
        seen.extend(prompts)
        return _oracle(prompts)

    scores = evaluate(
        suite, _samples(10), counting, out_dir=tmp_path, batch_size=4, show_progress=False
    )
    assert len(seen) == 2 and scores["Overall"] == 100.0 and scores["num_samples"] == 10.0
    assert path.read_text(encoding="utf-8").count("\n") == 10


def test_resume_false_starts_over_and_bad_backends_are_rejected(tmp_path):
    suite = longbench_v2.make_suite(max_prompt_tokens=None)
    evaluate(suite, _samples(4), _oracle, out_dir=tmp_path, show_progress=False)
    wrong = evaluate(
        suite,
        _samples(4),
        lambda p: ["The correct answer is (D)"] * len(p),
        out_dir=tmp_path,
        resume=False,
        show_progress=False,
    )
    assert wrong["Overall"] == 25.0
    with pytest.raises(ValueError, match="returned 1 completions for 2 prompts"):
        evaluate(suite, _samples(2), lambda p: ["x"], out_dir=tmp_path / "b", show_progress=False)
    with pytest.raises(ValueError, match="duplicate sample ids"):
        evaluate(suite, _samples(2) * 2, _oracle, out_dir=tmp_path / "c", show_progress=False)


def test_official_cot_runs_a_second_turn_without_the_document(tmp_path):
    suite = longbench_v2.make_suite(style="cot", max_prompt_tokens=None)
    seen = []

    def backend(prompts):
        seen.append(prompts)
        if prompts[0].endswith("Let’s think step by step:"):
            return ["it must be the first letter"] * len(prompts)
        return ["The correct answer is (A)"] * len(prompts)

    scores = evaluate(suite, _samples(2), backend, out_dir=tmp_path, show_progress=False)
    assert scores["Overall"] == 50.0  # q0's answer is A, q1's is B
    assert "doc 0" in seen[0][0] and "doc 0" not in seen[1][0]
    assert "Let’s think step by step: it must be the first letter" in seen[1][0]
    record = read_predictions(predictions_path(tmp_path, suite.name))[0]
    assert record["response_first_turn"] == "it must be the first letter"


PAPER_TABLE1 = {
    "Qwen3-8B-SFT": {
        "Overall": 27.04,
        "Easy": 28.65,
        "Hard": 26.05,
        "Short": 32.22,
        "Medium": 24.65,
        "Long": 23.15,
    },
    "Qwen3-8B-SFT w/ DAPO": {
        "Overall": 32.80,
        "Easy": 40.10,
        "Hard": 28.30,
        "Short": 38.33,
        "Medium": 28.37,
        "Long": 32.41,
    },
    "Qwen3-8B-SFT w/ LongAct": {
        "Overall": 36.73,
        "Easy": 38.02,
        "Hard": 35.93,
        "Short": 41.94,
        "Medium": 33.37,
        "Long": 34.72,
    },
}


def test_report_writes_markdown_and_csv_with_table1_columns(tmp_path):
    md_path, csv_path = write_report(
        PAPER_TABLE1,
        LONGBENCH_V2_TABLE,
        out_path=tmp_path / "table1",
        baseline="Qwen3-8B-SFT w/ DAPO",
    )
    md = md_path.read_text(encoding="utf-8").splitlines()
    assert md[2] == "| Model | Overall | Easy | Hard | Short | Medium | Long |"
    assert (
        md[6]
        == "| Qwen3-8B-SFT w/ LongAct | **36.73** | 38.02 | **35.93** | **41.94** | **33.37** | **34.72** |"
    )
    # the paper's quoted gains of LongAct over DAPO: +3.93 overall, +7.63 hard
    delta = next(line for line in md if line.startswith("| Qwen3-8B-SFT w/ LongAct vs"))
    assert "+3.93" in delta and "+7.63" in delta
    rows = list(csv.reader(io.StringIO(csv_path.read_text(encoding="utf-8"))))
    assert rows[0] == ["Model", "Overall", "Easy", "Hard", "Short", "Medium", "Long"]
    assert rows[1] == ["Qwen3-8B-SFT", "27.04", "28.65", "26.05", "32.22", "24.65", "23.15"]
    assert len(rows) == 1 + 3 + 2  # header, models, deltas vs the baseline


def test_report_ruler_and_infinitebench_layouts(tmp_path):
    spec = ruler_table()
    assert spec.columns[:5] == (
        "Ruler-128k NIAH-sub",
        "Ruler-128k NIAH",
        "Ruler-128k VT",
        "Ruler-128k QA",
        "Ruler-128k Avg",
    )
    assert spec.columns[5] == "Ruler-64k NIAH-sub" and len(spec.columns) == 10
    row = ruler_row(
        {"128k": {"NIAH-sub": 34.55, "NIAH": 63.70, "VT": 75.24, "QA": 31.10, "Avg": 51.15}}
    )
    md = render_markdown({"LongAct": row}, spec)
    assert "| LongAct | 34.55 | 63.70 | 75.24 | 31.10 | 51.15 | - | - | - | - | - |" in md
    md = render_markdown({"m": {"Re.Pa": 86.44, "Avg.": 49.39}}, INFINITEBENCH_TABLE)
    assert "| Model | Re.Pa | Re.Nu | En.Sum | En.QA | Zh.QA | En.MC | Avg. |" in md
    with pytest.raises(ValueError, match="baseline"):
        render_markdown({"m": {}}, INFINITEBENCH_TABLE, baseline="other")
    scores_file = tmp_path / "s.scores.json"
    scores_file.write_text(json.dumps({"Re.Pa": 1.0}), encoding="utf-8")
    assert load_scores(scores_file) == {"Re.Pa": 1.0}
