"""Fixtures for the data tests: the committed tiny tokenizer, loaded once."""

import pytest

from megatron_longact.data.tokenizer import TINY_TOKENIZER_DIR, load_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return load_tokenizer(TINY_TOKENIZER_DIR)
