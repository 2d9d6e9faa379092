"""`longact plan`: exit status, printed table and messages, and reading a run config."""

import json
import re

import yaml

from megatron_longact.config.schema import LOGPROB_CHUNK_TOKENS
from megatron_longact.plan.cli import main

RL_8B = ["--model", "qwen3-8b", "--nodes", "8", "--tp", "2", "--cp", "4"]


def test_good_layout_prints_table_and_returns_zero(capsys):
    status = main(
        [*RL_8B, "--seq-length", "32768", "--global-batch-size", "128", "--rollout-batch", "4"]
    )
    out = capsys.readouterr().out
    assert status == 0
    assert "qwen3-8b: 8.19B parameters" in out
    assert "TP 2 x PP 1 x CP 4 x DP 8" in out
    assert "1 x 8 x 16 = 128" in out
    assert "9.00 GiB" in out  # the rollout KV cache
    assert "fits" in out


def test_bad_layout_exits_one_with_the_reason(capsys):
    status = main([*RL_8B, "--seq-length", "32764", "--global-batch-size", "128"])
    err = capsys.readouterr().err
    assert status == 1
    assert "bad layout" in err
    assert "2 x context_parallel_size = 8" in err


def test_over_budget_prints_table_then_fails(capsys):
    status = main(
        [
            "--model",
            "qwen3-32b",
            "--nodes",
            "8",
            "--seq-length",
            "32768",
            "--global-batch-size",
            "64",
        ]
    )
    captured = capsys.readouterr()
    assert status == 1
    assert "does not fit" in captured.out
    assert "exceeds the 80 GiB GPU" in captured.err


def test_reads_parallel_data_and_rl_sections_with_overrides(tmp_path, capsys):
    model_dir = tmp_path / "Qwen3-8B-Base"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(
        json.dumps(
            {
                "model_type": "qwen3",
                "hidden_size": 4096,
                "num_hidden_layers": 36,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "head_dim": 128,
                "intermediate_size": 12288,
                "vocab_size": 151936,
                "max_position_embeddings": 32768,
                "tie_word_embeddings": False,
            }
        )
    )
    config = {
        "model": {"hf_path": str(model_dir)},
        "parallel": {"tensor_model_parallel_size": 2, "context_parallel_size": 2},
        "data": {"seq_length": 16384, "micro_batch_size": 1},
        "train": {"recompute": "full"},
        "rl": {"prompts_per_step": 8, "rollouts_per_prompt": 16, "max_seq_length": 32768},
    }
    path = tmp_path / "rl.yaml"
    path.write_text(yaml.safe_dump(config))
    status = main(["--config", str(path), "--nodes", "8", "parallel.context_parallel_size=4"])
    out = capsys.readouterr().out
    assert status == 0
    # Model from model.hf_path, CP from the override, sequence from rl.max_seq_length, global
    # batch = 8 x 16 rollouts spread as 4 per replica over 32 TP groups.
    assert "Qwen3-8B-Base: 8.19B parameters" in out
    assert "TP 2 x PP 1 x CP 4 x DP 8" in out
    assert "32768 / 8192 tokens" in out
    assert "1 x 8 x 16 = 128" in out
    assert "full" in out
    assert "9.00 GiB" in out
    # parallel.sequence_parallel is absent: off, as in the training config's default.
    assert re.search(r"sequence parallel\s+│\s+off", out)
    # rl.logprob_chunk_tokens reaches the logits term: unchunked (0) holds the fp32
    # temporaries of every token at once, so its logits row is larger; the flag wins.
    logits = {}
    flag = ["--logprob-chunk-tokens", str(LOGPROB_CHUNK_TOKENS)]
    for name, extra in (("config", []), ("unchunked", ["rl.logprob_chunk_tokens=0"]),
                        ("flag", ["rl.logprob_chunk_tokens=0", *flag])):  # fmt: skip
        assert main(["--config", str(path), "--nodes", "8", *extra]) == 0
        row = re.search(r"logits\s+│\s+([0-9.]+) GiB", capsys.readouterr().out)
        logits[name] = float(row[1])
    assert logits["unchunked"] > logits["config"] == logits["flag"], logits


def test_config_preset_resolves_to_the_packaged_model(tmp_path, capsys):
    path = tmp_path / "cpu.yaml"
    path.write_text(
        yaml.safe_dump({"model": {"preset": "tiny-qwen3"}, "data": {"seq_length": 512}})
    )
    assert main(["--config", str(path), "--gpus-per-node", "2"]) == 0
    out = capsys.readouterr().out
    # tiny-qwen3: 4 layers of h=128, 4 heads, 2 KV heads of 32, f=384, tied vocab of 1024.
    assert "tiny-qwen3: 0.92M parameters" in out


def test_flags_win_over_config(tmp_path, capsys):
    path = tmp_path / "sft.yaml"
    path.write_text(
        yaml.safe_dump(
            {"parallel": {"tensor_model_parallel_size": 4}, "data": {"seq_length": 4096}}
        )
    )
    status = main(
        ["--config", str(path), "--model", "qwen3-4b", "--tp", "1", "--gpus-per-node", "8"]
    )
    assert status == 0
    assert "TP 1 x PP 1 x CP 1 x DP 8" in capsys.readouterr().out


def test_missing_model_and_bad_override_are_explained(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"seq_length": 4096}}))
    assert main(["--config", str(path)]) == 1
    assert "pass --model" in capsys.readouterr().err
    assert main(["--config", str(path), "--model", "qwen3-8b", "parallel.tp"]) == 1
    assert "section.field=value" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 1
    assert "not found" in capsys.readouterr().err


def test_rollout_pool_uses_the_given_gpu_memory(capsys):
    argv = [*RL_8B, "--seq-length", "32768", "--global-batch-size", "128", "--rollout-batch", "4"]
    status = main(
        [*argv, "--gpu-mem-gib", "141", "--rollout-mem-fraction", "0.2", "--rollout-sleep"]
    )
    out = capsys.readouterr().out
    assert status == 0
    assert "rollout KV cache (sleeps in training)" in out
    assert "28.20 GiB" in out  # 0.2 x 141 GiB reserved, more than the 9 GiB cache
    assert "/ 141 GiB" in out
