"""RULER's own generated files and essay haystack, read as NVIDIA/RULER writes them."""

from __future__ import annotations

import json

import pytest

from megatron_longact.data.jsonl import DataFormatError
from megatron_longact.eval.ruler.files import load_haystack_text, load_ruler_dir

ROW = {"index": 7, "input": "Find it. The key is 42.", "outputs": ["42"], "length": 300,
       "length_w_model_temp": 300, "answer_prefix": " The key is"}  # fmt: skip


def _write(folder, task, rows):
    (folder / task).mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (folder / task / "validation.jsonl").write_text(text, encoding="utf-8")


def test_length_from_the_run_sh_layout_and_from_the_rows(tmp_path):
    data = tmp_path / "synthetic" / "8192" / "data"
    _write(data, "niah_single_1", [ROW, {**ROW, "index": 3}])
    _write(data, "vt", [{k: v for k, v in ROW.items() if k != "answer_prefix"}])
    samples = load_ruler_dir(data)
    assert [(s.task, s.index, s.max_seq_length) for s in samples] == [
        ("niah_single_1", 0, 8192), ("niah_single_1", 1, 8192), ("vt", 0, 8192)
    ]  # fmt: skip
    assert samples[0].prompt == ROW["input"] + ROW["answer_prefix"]
    assert samples[2].answer_prefix == "" and samples[0].num_tokens == 300
    assert [s.task for s in load_ruler_dir(data, tasks=("vt",))] == ["vt"]
    # Outside run.sh's layout the length is the largest 'length' field.
    loose = tmp_path / "loose"
    _write(loose, "qa_1", [ROW, {**ROW, "length": 500}])
    assert {s.max_seq_length for s in load_ruler_dir(loose / "qa_1" / "validation.jsonl")} == {500}


def test_errors_name_the_file_and_field(tmp_path):
    _write(tmp_path, "niah_single_9", [ROW])
    with pytest.raises(DataFormatError, match="niah_single_9.* not a RULER task"):
        load_ruler_dir(tmp_path)
    _write(tmp_path / "b", "vt", [ROW, {**ROW, "outputs": "42"}])
    with pytest.raises(DataFormatError, match=r"validation\.jsonl:2: field 'outputs'"):
        load_ruler_dir(tmp_path / "b")
    _write(tmp_path / "c", "vt", [{"input": "x", "outputs": ["1"]}])
    with pytest.raises(DataFormatError, match="missing required field 'length'"):
        load_ruler_dir(tmp_path / "c")
    (tmp_path / "d").mkdir()
    with pytest.raises(FileNotFoundError, match="no <task>/validation.jsonl"):
        load_ruler_dir(tmp_path / "d")


def test_haystack_folder_json_and_text(tmp_path):
    (tmp_path / "essays").mkdir()
    (tmp_path / "essays" / "2.txt").write_text("Second essay. ")
    (tmp_path / "essays" / "1.txt").write_text("First essay. ")
    assert load_haystack_text(tmp_path / "essays") == "First essay. Second essay. "
    (tmp_path / "PaulGrahamEssays.json").write_text(json.dumps({"text": "All essays."}))
    assert load_haystack_text(tmp_path / "PaulGrahamEssays.json") == "All essays."
    (tmp_path / "bad.json").write_text(json.dumps(["no text"]))
    with pytest.raises(DataFormatError, match="PaulGrahamEssays.json"):
        load_haystack_text(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="ruler_haystack_path"):
        load_haystack_text(tmp_path / "nope")
