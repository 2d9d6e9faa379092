"""Every source, as JSONL, as parquet and as an HF ``save_to_disk`` folder, loads to the same
records. The HF folders under fixtures/hf were written by the real ``datasets`` (see
fixtures/make_hf_folders.py); parquet is written here with pyarrow, as pandas and verl do."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from format_rows import SOURCES

from megatron_longact.data.chat import load_sft_dataset
from megatron_longact.data.conversations import messages_of
from megatron_longact.data.jsonl import DataFormatError
from megatron_longact.data.prompts import answer_kind, user_message
from megatron_longact.data.records import read_records
from megatron_longact.data.rl_data import RLRecord, load_docqa_rl, load_memagent_rl, load_rl_jsonl
from megatron_longact.eval.infinitebench import load_infinitebench
from megatron_longact.eval.longbench_v2 import load_longbench_v2

HF = Path(__file__).parent / "fixtures" / "hf"


def _containers(tmp_path: Path, name: str) -> dict[str, Path]:
    """The rows of source ``name`` as JSONL, parquet, a Hub-style parquet snapshot folder and
    the committed HF folder."""
    rows = SOURCES[name]
    jsonl = tmp_path / f"{name}.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    parquet = tmp_path / f"{name}.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    snapshot = tmp_path / f"{name}_hub" / "data"
    snapshot.mkdir(parents=True)
    shutil.copy(parquet, snapshot / "train-00000-of-00001.parquet")
    return {"jsonl": jsonl, "parquet": parquet, "hub": snapshot.parent, "hf": HF / name}


def _same_under_every_container(tmp_path, name, load):
    loaded = {kind: load(path) for kind, path in _containers(tmp_path, name).items()}
    first = loaded["jsonl"]
    assert first, name
    for kind, records in loaded.items():
        assert records == first, f"{name}: {kind} differs from jsonl"
    return first


def _sft_rows(samples):
    return [(s.input_ids, s.loss_mask) for s in samples]


@pytest.mark.parametrize("name", ["am_sft", "messages_sft"])
def test_sft_sources(tmp_path, tiny_tokenizer, name):
    samples = _same_under_every_container(
        tmp_path, name, lambda p: _sft_rows(load_sft_dataset(p, tiny_tokenizer, max_length=512))
    )
    assert len(samples) == len(SOURCES[name])


def test_sharegpt_rows_become_messages():
    first, second = SOURCES["am_sft"]
    assert messages_of(first) == [  # an empty system is no turn
        {"role": "user", "content": "What is the code of the red fox?"},
        {"role": "assistant", "content": first["conversations"][1]["value"]},
    ]
    assert messages_of(second)[0] == {"role": "system", "content": "You are a careful reader."}
    with pytest.raises(DataFormatError, match=r"x:3: conversations\[0\]\.from is 'robot'"):
        messages_of({"conversations": [{"from": "robot", "value": "hi"}]}, where="x:3")
    with pytest.raises(DataFormatError, match="x:4: no 'messages'"):
        messages_of({"text": "hi"}, where="x:4")


def test_docqa_rl(tmp_path):
    mc, math_rec, yes_no = _same_under_every_container(tmp_path, "docqa_rl", load_docqa_rl)
    assert mc == RLRecord(
        id="long_toc_choices_0_20000-11",
        context="Chapter 1: Rivers. Chapter 2: Lakes.",
        question="Which chapter covers lakes?",
        answer="B",
        choices={"A": "Chapter 1", "B": "Chapter 2", "C": "Both", "D": "Neither"},
        source="long_toc_choices_0_20000",
    )
    assert (math_rec.answer, yes_no.answer) == ("300", "yes")
    # One prompt per answer type.
    assert [answer_kind(r) for r in (mc, math_rec, yes_no)] == ["letter", "number", "short"]
    assert "(B) Chapter 2\n" in user_message(mc, mc.context)
    assert "letter of the correct choice" in user_message(mc, mc.context)
    assert "give the number" in user_message(math_rec, math_rec.context)
    assert "yes/no" in user_message(yes_no, yes_no.context)


def test_memagent_rl(tmp_path):
    (record,) = _same_under_every_container(tmp_path, "memagent_rl", load_memagent_rl)
    assert record.answer == ("Ann Lee", "Lee") and record.id == "hotpotqa-4"


def test_our_rl_and_a_dataset_dict_folder(tmp_path):
    records = _same_under_every_container(tmp_path, "our_rl", load_rl_jsonl)
    assert records[2].choices == {"A": "red", "B": "blue", "C": "green"}  # nulls dropped
    assert load_rl_jsonl(HF / "our_rl_dict") == records  # DatasetDict: its only split


def test_longbench_v2(tmp_path):
    (sample,) = _same_under_every_container(tmp_path, "longbench_v2", load_longbench_v2)
    assert sample._id == "66f36490821e116aacb2cc22"


def test_infinitebench_task_file_parquet_or_folder(tmp_path):
    containers = _containers(tmp_path, "longbook_choice_eng")
    loaded = []
    for kind in ("jsonl", "parquet", "hf"):
        folder = tmp_path / f"ib_{kind}"
        folder.mkdir()
        source = containers[kind]
        target = folder / ("longbook_choice_eng" + (source.suffix if source.is_file() else ""))
        (shutil.copy if source.is_file() else shutil.copytree)(source, target)
        loaded.append(load_infinitebench(folder, tasks=("longbook_choice_eng",)))
    assert loaded[0] == loaded[1] == loaded[2]
    assert loaded[0][0].answer == ("Eve", "A")


def test_errors_name_the_file_and_row(tmp_path):
    bad = [dict(SOURCES["our_rl"][0]), {k: v for k, v in SOURCES["our_rl"][1].items()}]
    bad[1]["question"] = None
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "rl.parquet")
    with pytest.raises(DataFormatError, match=r"rl\.parquet: row 1: missing field 'question'"):
        load_rl_jsonl(tmp_path / "rl.parquet")
    # A parquet file under a .jsonl name is read as parquet (magic bytes), not as broken UTF-8.
    shutil.copy(tmp_path / "rl.parquet", tmp_path / "rl.jsonl")
    assert [r for _, r in read_records(tmp_path / "rl.jsonl")][0]["id"] == "kv-0"
    (tmp_path / "cut.parquet").write_bytes((tmp_path / "rl.parquet").read_bytes()[:40])
    with pytest.raises(DataFormatError, match=r"cut\.parquet: not a readable parquet file"):
        list(read_records(tmp_path / "cut.parquet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFormatError, match="neither a Hugging Face save_to_disk folder"):
        list(read_records(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        list(read_records(tmp_path / "missing.parquet"))
    broken = tmp_path / "broken_hf"
    shutil.copytree(HF / "our_rl", broken)
    next(broken.glob("*.arrow")).unlink()
    with pytest.raises(FileNotFoundError, match="shards .* are missing"):
        list(read_records(broken))
