"""Bad input gets a clear error naming the file, field or line, and loses nothing written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megatron_longact.config import ConfigError, JobConfig, load_config
from megatron_longact.config.schema import ParallelConfig
from megatron_longact.runtime.distributed import check_world_size
from megatron_longact.runtime.launch import run_local


def test_config_typo_names_file_key_and_suggestion(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("optim:\n  lr: 1.0e-5\n  warmup_ration: 0.03\n")
    with pytest.raises(ConfigError) as err:
        load_config(JobConfig, recipe)
    message = str(err.value)
    assert str(recipe) in message and "optim.warmup_ration" in message
    assert "Did you mean 'warmup_ratio'" in message


def test_override_type_error_names_field():
    with pytest.raises(ConfigError, match=r"data\.seq_length: expected an integer"):
        load_config(JobConfig, None, ["data.seq_length=long"])


def test_world_size_not_divisible_names_the_fields():
    parallel = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    with pytest.raises(ValueError, match="world size 6 is not divisible") as err:
        check_world_size(6, parallel)
    assert "tensor_model_parallel_size" in str(err.value)
    assert check_world_size(8, parallel) == 2


def _sft(overrides):
    from megatron_longact.sft.loop import run_sft

    run_sft(load_config(JobConfig, None, overrides))


def test_world_size_error_from_a_real_launch(synthetic_data_dir):
    with pytest.raises(RuntimeError, match="world size 2 is not divisible"):
        run_local(_sft, 2, ["model.preset=micro-qwen3", "parallel.tensor_model_parallel_size=4",
                            f"data.train_path={synthetic_data_dir / 'sft_train.jsonl'}"])  # fmt: skip


def test_missing_tokenizer_path_is_named(synthetic_data_dir, tmp_path):
    from megatron_longact.sft.data import load_sft_data

    job = load_config(JobConfig, None, [
        f"data.train_path={synthetic_data_dir / 'sft_train.jsonl'}",
        f"data.tokenizer_path={tmp_path / 'no_such_tokenizer'}",
    ])  # fmt: skip
    with pytest.raises(FileNotFoundError, match="no_such_tokenizer"):
        load_sft_data(job.data)


def test_malformed_jsonl_line_fails_cleanly_and_keeps_checkpoints(synthetic_data_dir, tmp_path):
    lines = (synthetic_data_dir / "sft_train.jsonl").read_text().splitlines()[:4]
    lines[2] = lines[2][: len(lines[2]) // 2]  # a truncated record on line 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    save_dir = tmp_path / "ckpt"
    (save_dir / "iter_0000005").mkdir(parents=True)
    (save_dir / "iter_0000005" / "metadata.json").write_text("{}")
    (save_dir / "latest").write_text("iter_0000005\n")
    before = {p: p.read_bytes() for p in save_dir.rglob("*") if p.is_file()}
    result = subprocess.run(
        [sys.executable, "-m", "megatron_longact.cli", "sft", "model.preset=micro-qwen3",
         f"data.train_path={bad}", f"checkpoint.save_dir={save_dir}", "logging.progress=false"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    assert f"{bad}:3" in result.stderr, result.stderr[-2000:]
    after = {p: p.read_bytes() for p in save_dir.rglob("*") if p.is_file()}
    assert after == before
    assert json.loads((save_dir / "iter_0000005" / "metadata.json").read_text()) == {}


def test_warmup_not_below_train_steps_is_one_cli_line(capsys):
    from megatron_longact.cli import main

    assert main(["sft", "optim.warmup_steps=5", "train.train_steps=5"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("longact: error: <defaults>: optim.warmup_steps=5")
    assert "AssertionError" not in line
