import json

import pytest
from transformers import AutoTokenizer

from megatron_longact.data.synthetic import tokenizer_training_text
from megatron_longact.data.tokenizer import (
    REASONING_TAGS,
    SPECIAL_TOKENS,
    TINY_TOKENIZER_DIR,
    build_tiny_tokenizer,
    load_tokenizer,
)


def test_special_tokens_and_tags_are_single_fixed_ids(tiny_tokenizer):
    for expected_id, token in enumerate([*SPECIAL_TOKENS, *REASONING_TAGS]):
        assert tiny_tokenizer.encode(token, add_special_tokens=False) == [expected_id]
        # Also single tokens when glued to text.
        ids = tiny_tokenizer.encode(f"x{token}7", add_special_tokens=False)
        assert expected_id in ids and len(ids) == 3
    assert tiny_tokenizer.eos_token == tiny_tokenizer.pad_token == "<|endoftext|>"
    assert tiny_tokenizer.eos_token_id == tiny_tokenizer.pad_token_id == 0
    assert 300 < len(tiny_tokenizer) <= 1024


@pytest.mark.parametrize(
    "text",
    [
        "The code of the silver falcon is 417.",
        "Unseen words: Zürich, naïve café, 😀, tabs\tand\nnewlines  double  spaces.",
        "<|im_start|>user\nhi<|im_end|>\n<think>a</think><answer>123</answer>",
    ],
)
def test_round_trip(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    assert tiny_tokenizer.decode(ids) == text


def test_digits_are_one_token_each(tiny_tokenizer):
    assert tiny_tokenizer.tokenize("417") == ["4", "1", "7"]


def test_skip_special_tokens_keeps_reasoning_tags(tiny_tokenizer):
    ids = tiny_tokenizer.encode("<think>so</think><answer>5</answer><|im_end|><|endoftext|>")
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == (
        "<think>so</think><answer>5</answer>"
    )


def test_chat_template_is_chatml(tiny_tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    text = tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_committed_tokenizer_matches_a_fresh_build(tmp_path, tiny_tokenizer):
    """The shipped asset is what the code builds (and the build is deterministic). Compared
    by vocabulary and encodings, not file bytes, which vary with the tokenizers version."""
    build_tiny_tokenizer(tmp_path)
    fresh = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert fresh.get_vocab() == tiny_tokenizer.get_vocab()
    assert fresh.chat_template == tiny_tokenizer.chat_template
    for text in tokenizer_training_text(num_lines=50, seed=123):
        assert fresh.encode(text) == tiny_tokenizer.encode(text)
    config = json.loads((TINY_TOKENIZER_DIR / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_vocab_size_is_an_upper_bound(tmp_path):
    tokenizer = build_tiny_tokenizer(tmp_path, vocab_size=300, num_training_lines=500)
    assert len(tokenizer) == 300
    with pytest.raises(ValueError, match="use at least 263"):
        build_tiny_tokenizer(tmp_path, vocab_size=200)


def test_missing_tokenizer_folder_says_how_to_build(tmp_path):
    missing = tmp_path / "no_such_tokenizer"
    with pytest.raises(FileNotFoundError) as info:
        load_tokenizer(missing)
    assert str(missing) in str(info.value) and "build_tiny_tokenizer" in str(info.value)
    with pytest.raises(FileNotFoundError, match="No tokenizer.json"):
        load_tokenizer(tmp_path)
