"""``longact eval`` over several generation replicas: each DP rank decodes a share of every
call's engine batches (``eval.backends.sharded_generate``), and the predictions are exactly
those of one process, greedy and sampled, including after a rank's predictions file fell
behind the others' (a crash mid-write). Real megatron models in gloo processes."""

from __future__ import annotations

import json

import pytest

from megatron_longact.eval.runner import predictions_path
from megatron_longact.runtime.launch import run_local

SUITE = "synthetic_kv"
SAMPLED = "synthetic_kv.T1"


def _sft(overrides: list[str]) -> None:
    from megatron_longact.config import JobConfig, load_config
    from megatron_longact.sft.loop import run_sft

    run_sft(load_config(JobConfig, None, overrides))


def _eval(overrides: list[str]) -> None:
    from megatron_longact.cli import main

    assert main(["eval", *overrides]) == 0


@pytest.fixture(scope="module")
def checkpoint(synthetic_data_dir, tmp_path_factory):
    """A few SFT steps of the micro model: sampled tokens depend on the weights, not on ties."""
    out = tmp_path_factory.mktemp("shard_sft")
    run_local(_sft, 1, [
        "model.preset=micro-qwen3", f"data.train_path={synthetic_data_dir / 'sft_train.jsonl'}",
        "data.seq_length=256", "data.micro_batch_size=4", "data.global_batch_size=8",
        "optim.lr=3e-3", "train.train_steps=4", f"checkpoint.save_dir={out / 'ckpt'}",
        f"logging.tensorboard_dir={out / 'tb'}", "logging.progress=false",
    ])  # fmt: skip
    return out / "ckpt"


def _responses(out, name: str) -> dict[str, object]:
    lines = predictions_path(out, name).read_text().splitlines()
    records = {r["id"]: r for r in map(json.loads, lines)}  # a re-generated id: the last wins
    if name == SAMPLED:
        return {i: [s["response"] for s in r["samples"]] for i, r in records.items()}
    return {i: r["response"] for i, r in records.items()}


@pytest.mark.slow
def test_three_replicas_decode_what_one_process_does(synthetic_data_dir, checkpoint, tmp_path):
    # 8 prompts, engine batches of 2: greedy calls of 6 (3 replicas x 2) then 2 prompts;
    # sampled calls of 2 prompts x 4 samples = 4 engine batches, dealt 2-1-1: every replica
    # idles in some round, which the round-robin has to keep paired.
    common = ["model.preset=micro-qwen3", f"checkpoint.load_dir={checkpoint}",
              "eval.suites=[synthetic_kv]", f"eval.synthetic_kv_path={synthetic_data_dir / 'rl_val.jsonl'}",
              "eval.max_new_tokens=24", "eval.batch_size=2", "eval.num_samples=4",
              "logging.progress=false"]  # fmt: skip
    one, three = tmp_path / "one", tmp_path / "three"
    run_local(_eval, 1, [*common, f"eval.out_dir={one}"])
    run_local(_eval, 3, [*common, f"eval.out_dir={three}"])
    for name in (SUITE, SAMPLED):
        expected = _responses(one, name)
        assert len(expected) == 8
        assert _responses(three, name) == expected, name
        for rank in (1, 2):  # every rank received every response
            assert _responses(three / f".rank{rank}", name) == expected, (name, rank)
    sampled = _responses(one, SAMPLED)
    assert any(len(set(s)) > 1 for s in sampled.values())  # the samples really are sampled

    # Rank 1 was killed after its first greedy write, rank 0 finished: on resume the ranks
    # agree on what is left (the ids every rank has), instead of making different calls.
    behind = predictions_path(three / ".rank1", SUITE)
    behind.write_text("".join(behind.read_text().splitlines(keepends=True)[:6]))
    run_local(_eval, 3, [*common, f"eval.out_dir={three}"])
    assert _responses(three, SUITE) == _responses(one, SUITE)
    assert _responses(three / ".rank1", SUITE) == _responses(one, SUITE)
