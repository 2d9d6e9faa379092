"""Tokenizer codecs for the eval tests: a whitespace split and a small byte-level BPE."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from megatron_longact.eval.ruler.text import NOISE_SENTENCE, essay_sentences
from megatron_longact.eval.tokens import TextCodec, as_codec

BPE_VOCAB_SIZE = 1500


@pytest.fixture(scope="session")
def ws_codec() -> TextCodec:
    """One token per whitespace-separated word."""
    return as_codec(encode=str.split, decode=" ".join)


@pytest.fixture(scope="session")
def bpe_codec() -> TextCodec:
    """A byte-level BPE trained in-process on filler text (lossless round trip, real merges)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = essay_sentences(random.Random(0), 2000) + [NOISE_SENTENCE] * 20
    tokenizer.train_from_iterator(corpus, trainer)
    return as_codec(
        encode=lambda text: tokenizer.encode(text).ids,
        decode=lambda ids: tokenizer.decode(list(ids)),
    )
