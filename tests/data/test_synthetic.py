import random
import re
from pathlib import Path

import pytest

from megatron_longact.data.chat import tokenize_conversation
from megatron_longact.data.jsonl import read_jsonl
from megatron_longact.data.rl_data import load_rl_jsonl
from megatron_longact.data.synthetic import (
    format_prompt,
    make_rl_records,
    make_sft_records,
    make_task,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_same_seed_same_records_different_seed_different(tiny_tokenizer):
    kwargs = {"num_samples": 3, "context_tokens": 200, "tokenizer": tiny_tokenizer}
    assert make_sft_records(seed=7, **kwargs) == make_sft_records(seed=7, **kwargs)
    assert make_sft_records(seed=7, **kwargs) != make_sft_records(seed=8, **kwargs)
    assert make_rl_records(seed=7, **kwargs) == make_rl_records(seed=7, **kwargs)


@pytest.mark.parametrize("context_tokens", [256, 2048])
def test_context_length_is_close_to_target(tiny_tokenizer, context_tokens):
    rng = random.Random(0)
    for _ in range(3):
        task = make_task(rng, context_tokens=context_tokens, tokenizer=tiny_tokenizer)
        num_tokens = len(tiny_tokenizer.encode(task.context, add_special_tokens=False))
        # Filler stops at the first sentence reaching the budget: at most one sentence over.
        assert context_tokens - 2 <= num_tokens <= context_tokens + 16, num_tokens


def test_answer_appears_once_as_the_queried_fact(tiny_tokenizer):
    rng = random.Random(3)
    for _ in range(5):
        task = make_task(rng, context_tokens=300, tokenizer=tiny_tokenizer, num_facts=5)
        facts = re.findall(r"The code of the (\w+ \w+) is (\d{3})\.", task.context)
        assert len(facts) == 5
        assert len({k for k, _ in facts}) == 5 and len({v for _, v in facts}) == 5
        assert dict(facts)[task.key] == task.answer
        assert task.question == f"What is the code of the {task.key}?"
        assert task.context.count(task.fact) == 1


def test_sft_record_shape_and_loss_mask(tiny_tokenizer):
    (record,) = make_sft_records(
        num_samples=1, context_tokens=256, tokenizer=tiny_tokenizer, seed=1
    )
    user, assistant = record["messages"]
    assert user["role"] == "user" and assistant["role"] == "assistant"
    match = re.fullmatch(r"<think>(.*)</think><answer>(\d{3})</answer>", assistant["content"])
    assert match, assistant["content"]
    value = match.group(2)
    assert f"is {value}." in user["content"] and f"is {value}." in match.group(1)
    sample = tokenize_conversation(record["messages"], tiny_tokenizer, max_length=1024)
    trained = [t for t, m in zip(sample.input_ids, sample.loss_mask) if m]
    assert tiny_tokenizer.decode(trained) == assistant["content"] + "<|im_end|>"
    assert 256 < sample.num_tokens < 256 + 100


def test_rl_records_match_sft_prompts(tiny_tokenizer):
    kwargs = {"num_samples": 2, "context_tokens": 150, "tokenizer": tiny_tokenizer, "seed": 5}
    rl = make_rl_records(id_prefix="val", **kwargs)
    sft = make_sft_records(**kwargs)
    assert [r["id"] for r in rl] == ["val-0", "val-1"]
    for rl_record, sft_record in zip(rl, sft):
        assert set(rl_record) == {"id", "context", "question", "answer", "choices", "source"}
        assert f"is {rl_record['answer']}." in rl_record["context"]
        prompt = format_prompt(rl_record["context"], rl_record["question"])
        assert sft_record["messages"][0]["content"] == prompt


def test_too_small_context_is_rejected(tiny_tokenizer):
    with pytest.raises(ValueError, match="too small to hold 4 facts"):
        make_task(random.Random(0), context_tokens=20, tokenizer=tiny_tokenizer)


def test_make_synthetic_data_cli_writes_four_splits(tiny_tokenizer, tmp_path):
    from megatron_longact.data import make_synthetic as tool

    tool.main(["--out-dir", str(tmp_path), "--context-tokens", "128", "--sft-train", "3",
               "--sft-val", "2", "--rl-train", "2", "--rl-val", "1", "--seed", "10"])  # fmt: skip
    counts = {name: len(list(read_jsonl(tmp_path / f"{name}.jsonl")))
              for name in ("sft_train", "sft_val", "rl_train", "rl_val")}  # fmt: skip
    assert counts == {"sft_train": 3, "sft_val": 2, "rl_train": 2, "rl_val": 1}
    sft_val = [r for _, r in read_jsonl(tmp_path / "sft_val.jsonl")]
    seed = 10 + tool.SPLIT_SEED_OFFSETS["sft_val"]
    expected = make_sft_records(
        num_samples=2, context_tokens=128, tokenizer=tiny_tokenizer, seed=seed
    )
    assert sft_val == expected
    rl_train = [r for _, r in read_jsonl(tmp_path / "rl_train.jsonl")]
    seed = 10 + tool.SPLIT_SEED_OFFSETS["rl_train"]
    assert rl_train == make_rl_records(
        num_samples=2, context_tokens=128, tokenizer=tiny_tokenizer, seed=seed, id_prefix="rl_train"
    )
    # The RL stage's loader reads the synthetic records as they are.
    loaded = load_rl_jsonl(tmp_path / "rl_train.jsonl")
    assert [(r.id, r.answer, r.source) for r in loaded] == [
        (r["id"], r["answer"], "synthetic_kv") for r in rl_train
    ]
