import json

import pytest

from megatron_longact.data.chat import (
    SampleTooLongError,
    load_sft_dataset,
    tokenize_conversation,
)
from megatron_longact.data.jsonl import DataFormatError

CONVERSATION = [
    {"role": "system", "content": "You answer questions."},
    {"role": "user", "content": "What is the code of the red fox?"},
    {"role": "assistant", "content": "<think>The text says 512.</think><answer>512</answer>"},
    {"role": "user", "content": "And the blue owl?"},
    {"role": "assistant", "content": "<think>It is 907.</think><answer>907</answer>"},
]


def _runs(ids: list[int], mask: list[int], value: int) -> list[list[int]]:
    """Maximal runs of ids whose mask equals value."""
    runs, current = [], []
    for token, m in zip(ids, mask):
        if m == value:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def test_loss_mask_covers_exactly_assistant_content_and_im_end(tiny_tokenizer):
    sample = tokenize_conversation(CONVERSATION, tiny_tokenizer, max_length=512)
    assert len(sample.input_ids) == len(sample.loss_mask) == sample.num_tokens
    assert set(sample.loss_mask) == {0, 1}
    trained = [tiny_tokenizer.decode(run) for run in _runs(sample.input_ids, sample.loss_mask, 1)]
    assert trained == [
        m["content"] + "<|im_end|>" for m in CONVERSATION if m["role"] == "assistant"
    ]
    untrained = [tiny_tokenizer.decode(r) for r in _runs(sample.input_ids, sample.loss_mask, 0)]
    assert untrained == [
        "<|im_start|>system\nYou answer questions.<|im_end|>\n<|im_start|>user\n"
        "What is the code of the red fox?<|im_end|>\n<|im_start|>assistant\n",
        "\n<|im_start|>user\nAnd the blue owl?<|im_end|>\n<|im_start|>assistant\n",
        "\n",
    ]


def test_ids_match_the_tokenizer_chat_template(tiny_tokenizer):
    sample = tokenize_conversation(CONVERSATION, tiny_tokenizer, max_length=512)
    expected = tiny_tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False)
    assert sample.input_ids == list(expected)


@pytest.mark.parametrize(
    ("messages", "pattern"),
    [
        ([{"role": "bot", "content": "x"}], r"messages\[0\]\.role is 'bot'"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": 3}],
         r"messages\[1\]\.content must be a string, got int"),
        ([{"role": "assistant"}], r"messages\[0\] is missing field 'content'"),
        ([{"role": "user", "content": "x"}], "no assistant turn"),
        ([], "non-empty list"),
        ("hello", "non-empty list"),
    ],
)  # fmt: skip
def test_invalid_messages_are_named(tiny_tokenizer, messages, pattern):
    with pytest.raises(ValueError, match=pattern):
        tokenize_conversation(messages, tiny_tokenizer, max_length=512)


def test_too_long_raises_and_exact_length_fits(tiny_tokenizer):
    n = tokenize_conversation(CONVERSATION, tiny_tokenizer, max_length=10_000).num_tokens
    assert tokenize_conversation(CONVERSATION, tiny_tokenizer, max_length=n).num_tokens == n
    with pytest.raises(SampleTooLongError) as info:
        tokenize_conversation(CONVERSATION, tiny_tokenizer, max_length=n - 1)
    assert info.value.num_tokens == n and info.value.max_length == n - 1


def _write(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


def test_load_sft_dataset_drops_and_counts_long_samples(tiny_tokenizer, tmp_path, caplog):
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    long = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    path = _write(tmp_path / "sft.jsonl", [{"messages": short}, {"messages": long},
                                            {"messages": short}])  # fmt: skip
    with caplog.at_level("WARNING"):
        dataset = load_sft_dataset(path, tiny_tokenizer, max_length=64)
    assert len(dataset) == 2 and dataset.num_dropped == 1 and dataset.dropped_at == [f"{path}:2"]
    assert (
        dataset[0].input_ids
        == tokenize_conversation(short, tiny_tokenizer, max_length=64).input_ids
    )
    assert "Dropped 1 of 3" in caplog.text


def test_load_sft_dataset_errors_name_file_line_and_field(tiny_tokenizer, tmp_path):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    bad_role = {"messages": [{"role": "robot", "content": "a"}]}
    path = _write(tmp_path / "bad.jsonl", [good, good, bad_role])
    with pytest.raises(DataFormatError) as info:
        load_sft_dataset(path, tiny_tokenizer, max_length=64)
    assert f"{path}:3: field 'messages': messages[0].role is 'robot'" in str(info.value)

    missing = _write(tmp_path / "missing.jsonl", [good, {"conversation": []}])
    with pytest.raises(DataFormatError, match=r"missing\.jsonl:2: no 'messages' .*'conversations'"):
        load_sft_dataset(missing, tiny_tokenizer, max_length=64)
