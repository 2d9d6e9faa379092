"""Bad input: one line saying what, where and how to fix it (``longact: error: ...``, exit 2),
once per job, never a traceback."""

from __future__ import annotations

import pytest
from fault_helpers import run_cli

from megatron_longact.cli import main as longact_main
from megatron_longact.config import ConfigError, JobConfig, load_config
from megatron_longact.config.schema import check_rl_batch, check_sequence_length


def _one_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("longact: error: "), lines
    return lines[0]


def test_warmup_not_below_train_steps_is_a_config_error():
    with pytest.raises(ConfigError, match=r"optim.warmup_steps=10 .* below train.train_steps=10"):
        load_config(JobConfig, None, ["optim.warmup_steps=10", "train.train_steps=10"])
    with pytest.raises(ConfigError, match="optim.warmup_steps=1 "):  # ceil(0.03 x 1) = 1
        load_config(JobConfig, None, ["train.train_steps=1"])
    load_config(JobConfig, None, ["optim.warmup_steps=9", "train.train_steps=10"])


def test_seq_length_above_max_position_embeddings_is_refused():
    with pytest.raises(ConfigError, match="data.seq_length=2048 exceeds model.max_position"):
        load_config(JobConfig, None, ["model.max_position_embeddings=1024",
                                      "data.seq_length=2048"])  # fmt: skip
    with pytest.raises(ValueError, match="data.seq_length=2048 exceeds the model's max_position"):
        check_sequence_length(seq_length=2048, max_position_embeddings=1024,
                              field="data.seq_length")  # fmt: skip


def test_rl_global_batch_smaller_than_the_updates_is_refused():
    job = load_config(JobConfig, None, ["rl.prompts_per_step=1", "rl.rollouts_per_prompt=2",
                                        "rl.num_minibatches=3"])  # fmt: skip
    with pytest.raises(ValueError, match=r"1 x 2 = 2 samples is smaller than rl.num_minibatches"):
        check_rl_batch(job, dp=2)
    # Any other count works: rl.batch.plan_step drops nothing (3 x 2 over DP 4 included).
    check_rl_batch(load_config(JobConfig, None, ["rl.prompts_per_step=3",
                                                 "rl.rollouts_per_prompt=2"]), dp=4)  # fmt: skip


def test_empty_sft_file_says_empty(tmp_path):
    from megatron_longact.sft.data import load_sft_data

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    job = load_config(JobConfig, None, [f"data.train_path={empty}"])
    with pytest.raises(ValueError, match=r"empty.jsonl holds no samples \(an empty file"):
        load_sft_data(job.data)


@pytest.mark.parametrize("name", ["data.json", "data.jsonl"])
def test_non_utf8_longbench_file_is_named(tmp_path, name):
    from megatron_longact.eval.longbench_v2 import load_longbench_v2

    path = tmp_path / name
    record = b'{"_id": "a", "question": "caf\xe9"}'
    path.write_bytes(b"[" + record + b"]" if name.endswith(".json") else record + b"\n")
    with pytest.raises(ValueError, match=rf"{name}.*not .*UTF-8"):
        load_longbench_v2(path)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tiny_hf import save_tiny_hf_model

    return save_tiny_hf_model(tmp_path_factory.mktemp("hf") / "tiny")


def _copy(hf_dir, tmp_path):
    import shutil

    return shutil.copytree(hf_dir, tmp_path / "hf")


def test_convert_into_non_empty_out_is_one_line(hf_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    argv = ["convert", "--direction", "hf2mcore", "--hf-dir", str(hf_dir), "--out", str(out)]
    assert longact_main(argv) == 2
    assert f"--out {out} exists and is not empty" in _one_line(capsys)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_truncated_safetensors_file_is_named(hf_dir, tmp_path, capsys):
    folder = _copy(hf_dir, tmp_path)
    shard = sorted(folder.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size - 100])
    argv = ["convert", "--direction", "hf2mcore", "--hf-dir", str(folder),
            "--out", str(tmp_path / "out")]  # fmt: skip
    assert longact_main(argv) == 2
    line = _one_line(capsys)
    assert str(shard) in line and "truncated or corrupt" in line
    assert not (tmp_path / "out").exists()


def test_tp_not_dividing_heads_fails_before_workers_start(hf_dir, tmp_path, capsys, monkeypatch):
    import megatron_longact.runtime.launch as launch

    def no_workers(*_args, **_kwargs):
        raise AssertionError("workers were started")

    monkeypatch.setattr(launch, "run_local", no_workers)
    argv = ["convert", "--direction", "hf2mcore", "--hf-dir", str(hf_dir), "--tp", "3",
            "--out", str(tmp_path / "out")]  # fmt: skip
    assert longact_main(argv) == 2
    assert "--tp 3 does not divide the model's num_attention_heads=4" in _one_line(capsys)


def test_expert_parallel_on_a_dense_model_fails_before_workers_start(
    hf_dir, tmp_path, capsys, monkeypatch
):
    import megatron_longact.runtime.launch as launch

    def no_workers(*_args, **_kwargs):
        raise AssertionError("workers were started")

    monkeypatch.setattr(launch, "run_local", no_workers)
    argv = ["convert", "--direction", "hf2mcore", "--hf-dir", str(hf_dir), "--ep", "2",
            "--out", str(tmp_path / "out")]  # fmt: skip
    assert longact_main(argv) == 2
    assert "apply to mixture-of-experts models only; qwen3 is dense" in _one_line(capsys)


def test_moe_config_fields_that_cannot_map_are_user_errors():
    from megatron_longact.errors import UserError
    from megatron_longact.models.hf_config import parse_hf_config, read_hf_config, resolve_model_dir

    hf = read_hf_config(resolve_model_dir(hf_path=None, preset="micro-qwen3-moe"))
    with pytest.raises(UserError, match=r"decoder_sparse_step=2 cannot be mapped"):
        parse_hf_config({**hf, "decoder_sparse_step": 2})
    with pytest.raises(ConfigError, match=r"expert_model_parallel_size must be >= 1"):
        load_config(JobConfig, None, ["parallel.expert_model_parallel_size=0"])


@pytest.mark.slow
def test_under_the_launcher_two_ranks_print_one_line(synthetic_data_dir, tmp_path):
    from megatron_longact.runtime.distributed import free_port

    launcher = ["-m", "megatron_longact.runtime.launch", "--nnodes=1", "--nproc-per-node=2",
                "--master-addr=127.0.0.1", f"--master-port={free_port()}"]  # fmt: skip
    done = run_cli(["sft", "model.preset=micro-qwen3", f"data.train_path={tmp_path / 'no.jsonl'}",
                    "logging.progress=false"], launcher=launcher)  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.error_lines() == [
        f"longact: error: data file {tmp_path / 'no.jsonl'} not found; check the path in your "
        "config (JSONL, JSON list, parquet, or a Hugging Face dataset folder)"
    ]
    assert "ChildFailedError" not in done.stderr and "Traceback" not in done.stderr


def test_longact_schedule_fields_fail_at_load():
    # Found at load, not at the second optimizer step's selection refresh.
    with pytest.raises(ConfigError, match=r"longact: every_n_steps=0 must be >= 1"):
        load_config(JobConfig, None, ["longact.schedule=every_n_steps", "longact.every_n_steps=0"])
    with pytest.raises(ConfigError, match=r"train: log_interval must be >= 1"):
        load_config(JobConfig, None, ["train.log_interval=0"])


def test_only_user_errors_are_one_line_and_other_errors_keep_their_traceback(monkeypatch, capsys):
    import megatron_longact.data.make_synthetic as make_synthetic
    from megatron_longact.errors import UserError

    def user_mistake(_argv):
        raise UserError("data.train_path=x.jsonl: not found; fix the path")

    monkeypatch.setattr(make_synthetic, "main", user_mistake)
    assert longact_main(["data"]) == 2
    assert _one_line(capsys) == "longact: error: data.train_path=x.jsonl: not found; fix the path"

    def broken_invariant(_argv):
        raise ValueError("internal: 3 rows for 4 samples")

    monkeypatch.setattr(make_synthetic, "main", broken_invariant)
    with pytest.raises(ValueError, match="internal: 3 rows for 4 samples"):
        longact_main(["data"])  # not swallowed into exit 2: the traceback reaches the user
