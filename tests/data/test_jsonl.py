import json
from pathlib import Path

import pytest

from megatron_longact.data.jsonl import DataFormatError, read_jsonl, write_jsonl


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_round_trip_keeps_records_and_counts_blank_lines(tmp_path):
    records = [{"a": 1, "text": "héllo"}, {"a": 2, "nested": {"x": [1, 2]}}]
    path = tmp_path / "sub" / "out.jsonl"
    assert write_jsonl(path, records) == 2
    assert [r for _, r in read_jsonl(path)] == records

    spaced = _write_lines(tmp_path / "spaced.jsonl", ['{"a": 1}', "", "   ", '{"a": 2}'])
    assert list(read_jsonl(spaced)) == [(1, {"a": 1}), (4, {"a": 2})]


def test_malformed_json_names_file_and_line(tmp_path):
    path = _write_lines(tmp_path / "bad.jsonl", ['{"a": 1}', "", '{"a": 2,'])
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:3: malformed JSON"):
        list(read_jsonl(path))


def test_non_object_line_is_rejected(tmp_path):
    path = _write_lines(tmp_path / "list.jsonl", ['{"a": 1}', "[1, 2]"])
    with pytest.raises(DataFormatError, match=r"list\.jsonl:2: expected a JSON object, got list"):
        list(read_jsonl(path))


def test_missing_required_field_is_named(tmp_path):
    path = _write_lines(tmp_path / "f.jsonl", ['{"messages": []}', '{"msgs": []}'])
    with pytest.raises(DataFormatError) as info:
        list(read_jsonl(path, required_fields=("messages",)))
    message = str(info.value)
    assert f"{path}:2:" in message and "'messages'" in message and "'msgs'" in message
    assert isinstance(info.value, ValueError)


def test_invalid_utf8_names_line(tmp_path):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n')
    with pytest.raises(DataFormatError, match=r"bytes\.jsonl:2: line is not valid UTF-8"):
        list(read_jsonl(path))


def test_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        list(read_jsonl(missing))


def test_failed_write_keeps_previous_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "data.jsonl"
    write_jsonl(path, [{"v": 1}])

    def crashing():
        yield {"v": 2}
        raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError):
        write_jsonl(path, crashing())
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"v": 1}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]
