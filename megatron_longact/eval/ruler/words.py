"""RULER aggregation tasks: common words extraction (CWE) and frequent words extraction (FWE).

Follows RULER ``common_words_extraction.py`` (numbered word list, 10 words x30 among others x3,
one solved example first; x6/x1 below 4k tokens) and ``freq_words_extraction.py`` (random
6-letter coded words with Zipf(alpha) counts, the top word replaced by '...' noise, the next
three asked).
"""

from __future__ import annotations

import random
import string

from megatron_longact.errors import UserError
from megatron_longact.eval.ruler.config import (
    CWE_ANSWER_PREFIX,
    CWE_SHORT_CONTEXT,
    CWE_TEMPLATE,
    FWE_ANSWER_PREFIX,
    FWE_TEMPLATE,
    CommonWordsConfig,
    FreqWordsConfig,
)
from megatron_longact.eval.ruler.layout import Filled, fit_count, render
from megatron_longact.eval.ruler.text import riemann_zeta, word_pool
from megatron_longact.eval.tokens import TextCodec

# (distinct words, common repeats, uncommon repeats) of CWE's solved example: long / short context.
CWE_EXAMPLE_LONG = (40, 10, 3)
CWE_EXAMPLE_SHORT = (20, 3, 1)
# Main list repeats below CWE_SHORT_CONTEXT tokens (RULER hard-codes 6 and 1 there).
CWE_SHORT_REPEATS = (6, 1)
FWE_TOKENS_PER_VOCAB_WORD = 50  # RULER: vocab_size = max_seq_length // 50
FWE_NOISE_WORD = "..."
FWE_NUM_ANSWERS = 3


def _numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(words))


def _cwe_list(
    rng: random.Random, num_words: int, common_repeats: int, uncommon_repeats: int, num_cw: int
) -> tuple[str, list[str]]:
    words = word_pool(rng, num_words)
    common, uncommon = words[:num_cw], words[num_cw:]
    word_list = common * common_repeats + uncommon * uncommon_repeats
    rng.shuffle(word_list)
    return _numbered(word_list), common


def generate_cwe(
    cfg: CommonWordsConfig,
    *,
    task: str,
    seed: str,
    codec: TextCodec,
    budget: int,
    max_seq_length: int,
) -> tuple[Filled, list[str]]:
    """One CWE prompt fitting ``budget`` tokens; references are the ``num_cw`` common words."""
    short = max_seq_length < CWE_SHORT_CONTEXT
    example_shape = CWE_EXAMPLE_SHORT if short else CWE_EXAMPLE_LONG
    repeats = CWE_SHORT_REPEATS if short else (cfg.freq_cw, cfg.freq_ucw)

    def build(num_words: int) -> tuple[Filled, list[str]]:
        rng = random.Random(seed)
        examples = []
        for _ in range(cfg.num_fewshot):
            context, answer = _cwe_list(
                rng, example_shape[0], example_shape[1], example_shape[2], cfg.num_cw
            )
            examples.append(
                render(CWE_TEMPLATE, CWE_ANSWER_PREFIX, context=context).prompt
                + " "
                + _numbered(answer)
            )
        context, common = _cwe_list(rng, num_words, repeats[0], repeats[1], cfg.num_cw)
        head = "\n".join(examples) + "\n"
        filled = render(CWE_TEMPLATE, CWE_ANSWER_PREFIX, context=context)
        start, end = filled.context_span
        return Filled(
            head + filled.input, filled.answer_prefix, (start + len(head), end + len(head))
        ), common

    num_words = fit_count(
        lambda n: build(n)[0].prompt, codec=codec, budget=budget, minimum=cfg.num_cw + 1, task=task
    )
    return build(num_words)


def _fwe_vocab(rng: random.Random, vocab_size: int, word_len: int) -> list[str]:
    vocab: set[str] = set()
    while len(vocab) < vocab_size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=word_len)))
    ordered = sorted(vocab)
    rng.shuffle(ordered)
    ordered[0] = FWE_NOISE_WORD  # the most frequent rank is noise the model must ignore
    return ordered


def generate_fwe(
    cfg: FreqWordsConfig, *, task: str, seed: str, codec: TextCodec, budget: int
) -> tuple[Filled, list[str]]:
    """One FWE prompt fitting ``budget`` tokens; references are vocab ranks 2-4 (rank 1 is '...')."""
    vocab_size = cfg.vocab_size if cfg.vocab_size > 0 else budget // FWE_TOKENS_PER_VOCAB_WORD
    if vocab_size < FWE_NUM_ANSWERS + 1:
        raise UserError(
            f"RULER task {task}: vocab_size {vocab_size} too small; raise max_seq_length or vocab_size"
        )
    vocab = _fwe_vocab(random.Random(f"{seed}:vocab"), vocab_size, cfg.coded_wordlen)
    zeta = riemann_zeta(cfg.alpha)

    def build(num_words: int) -> Filled:
        words = [
            w
            for rank, w in enumerate(vocab, start=1)
            for _ in range(int(num_words * rank**-cfg.alpha / zeta))
        ]
        random.Random(f"{seed}:order").shuffle(words)
        return render(FWE_TEMPLATE, FWE_ANSWER_PREFIX, context=" ".join(words))

    num_words = fit_count(lambda n: build(n).prompt, codec=codec, budget=budget, task=task)
    return build(num_words), vocab[1 : 1 + FWE_NUM_ANSWERS]
