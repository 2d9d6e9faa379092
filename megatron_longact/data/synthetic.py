"""A synthetic long-context key-value retrieval task, for SFT and RL on tiny models.

Each sample is a "document" of filler sentences with ``num_facts`` key-value facts
("The code of the silver falcon is 417.") at random depths, and a question asking for one
key's value. The SFT target is ``<think>reasoning citing the fact</think><answer>417</answer>``,
the format the paper's cold-start SFT teaches (Sec. 3) and its RL format reward checks. Values
are 3-digit numbers and keys are two-word names from small closed lists, so a tiny model can
learn the retrieval in a few hundred CPU steps.

Everything is deterministic given ``seed`` (Python's ``random.Random``, no global state).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from megatron_longact.errors import UserError

DEFAULT_NUM_FACTS = 4
VALUE_MIN = 100  # values are 3-digit numbers: 3 tokens with per-digit tokenizers
VALUE_MAX = 999
# Filler sentences are drawn in batches of 64 (the draws define the data set: keep it) and
# tokenized 8 at a time until the document is long enough: one tokenizer call per 8 is much
# cheaper than one per sentence, and a short document needs only the first few of the 64.
_FILLER_BATCH = 64
_TOKENIZE_CHUNK = 8

SOURCE = "synthetic_kv"  # the RL records' "source" field
FACT_TEMPLATE = "The code of the {key} is {value}."
QUESTION_TEMPLATE = "What is the code of the {key}?"
PROMPT_TEMPLATE = (
    "Read the document and answer the question.\n\nDocument:\n{context}\n\n"
    "Question: {question}\nThink inside <think></think>, then give the number inside "
    "<answer></answer>."
)
REASONING_TEMPLATE = (
    "I need the code of the {key}. The document says: {fact} So the code is {value}."
)

KEY_ADJECTIVES = (
    "silver", "golden", "red", "blue", "green", "black", "white", "amber", "crimson", "violet",
    "bronze", "copper", "iron", "jade", "scarlet", "ivory", "azure", "coral", "olive", "pearl",
)  # fmt: skip
KEY_NOUNS = (
    "falcon", "tiger", "otter", "raven", "wolf", "fox", "heron", "badger", "lynx", "eagle",
    "salmon", "beetle", "panda", "cobra", "moose", "owl", "shark", "whale", "bison", "hawk",
)  # fmt: skip
# Filler words never include "code" or the key words, so the only place a key or value appears
# is its fact sentence.
_FILLER_ADJECTIVES = (
    "quiet", "old", "small", "large", "bright", "dark", "busy", "calm", "narrow", "wide",
    "warm", "cold", "early", "late", "tall", "young", "gentle", "heavy", "simple", "distant",
)  # fmt: skip
_FILLER_NOUNS = (
    "river", "village", "market", "garden", "teacher", "farmer", "bridge", "library", "road",
    "window", "train", "harbor", "forest", "city", "painter", "kitchen", "mountain", "student",
    "letter", "festival", "morning", "evening", "ship", "valley", "museum", "tower",
)  # fmt: skip
_FILLER_VERBS = (
    "passes", "faces", "reaches", "follows", "watches", "leaves", "joins", "crosses", "visits",
    "finds", "meets", "opens", "shelters", "greets", "circles",
)  # fmt: skip
_FILLER_ADVERBS = (
    "slowly", "often", "again", "quietly", "every day", "at dawn", "in winter", "after noon",
    "without a sound", "once more",
)  # fmt: skip


@dataclass(frozen=True)
class RetrievalTask:
    """One generated sample: the document, the question and the expected value."""

    context: str
    question: str
    answer: str  # the value, e.g. "417"
    fact: str  # the fact sentence holding the answer
    key: str


def format_prompt(context: str, question: str) -> str:
    """The user message for a task; SFT and RL prompts must match, so both call this."""
    return PROMPT_TEMPLATE.format(context=context, question=question)


def format_response(task: RetrievalTask) -> str:
    """The reference assistant reply: ``<think>...</think><answer>VALUE</answer>``."""
    reasoning = REASONING_TEMPLATE.format(key=task.key, fact=task.fact, value=task.answer)
    return f"<think>{reasoning}</think><answer>{task.answer}</answer>"


def _filler_sentence(rng: random.Random) -> str:
    adj1, adj2 = rng.choice(_FILLER_ADJECTIVES), rng.choice(_FILLER_ADJECTIVES)
    noun1, noun2 = rng.choice(_FILLER_NOUNS), rng.choice(_FILLER_NOUNS)
    verb, adverb = rng.choice(_FILLER_VERBS), rng.choice(_FILLER_ADVERBS)
    if rng.random() < 0.5:
        return f"The {adj1} {noun1} {verb} the {adj2} {noun2}."
    return f"The {adj1} {noun1} {verb} the {noun2} {adverb}."


def _filler_sentences(
    rng: random.Random, *, tokenizer: PreTrainedTokenizerBase, num_tokens: int
) -> list[str]:
    """Filler sentences totalling about ``num_tokens`` tokens (each counted with its leading
    space, as it appears after joining, so the sum tracks the joined text's length)."""
    sentences: list[str] = []
    total = 0
    while total < num_tokens:
        batch = [_filler_sentence(rng) for _ in range(_FILLER_BATCH)]
        for start in range(0, _FILLER_BATCH, _TOKENIZE_CHUNK):
            if total >= num_tokens:
                break
            chunk = batch[start : start + _TOKENIZE_CHUNK]
            encoded = tokenizer([" " + s for s in chunk], add_special_tokens=False)["input_ids"]
            for sentence, ids in zip(chunk, encoded):
                if total >= num_tokens:
                    break
                sentences.append(sentence)
                total += len(ids)
    return sentences


def make_task(
    rng: random.Random,
    *,
    context_tokens: int,
    tokenizer: PreTrainedTokenizerBase,
    num_facts: int = DEFAULT_NUM_FACTS,
) -> RetrievalTask:
    """Draw one task whose document is about ``context_tokens`` tokens long.

    Facts get distinct keys and distinct values and are inserted at uniformly random sentence
    positions; the queried fact is one of them, chosen uniformly. The document length is the
    joined text's token count under ``tokenizer``; it lands within about one filler sentence
    (~10 tokens) of the target.
    """
    max_facts = len(KEY_ADJECTIVES) * len(KEY_NOUNS)
    if not 1 <= num_facts <= max_facts:
        raise UserError(f"num_facts={num_facts} must be in [1, {max_facts}].")
    names = rng.sample(range(max_facts), num_facts)
    keys = [f"{KEY_ADJECTIVES[i // len(KEY_NOUNS)]} {KEY_NOUNS[i % len(KEY_NOUNS)]}" for i in names]
    values = [str(v) for v in rng.sample(range(VALUE_MIN, VALUE_MAX + 1), num_facts)]
    facts = [FACT_TEMPLATE.format(key=k, value=v) for k, v in zip(keys, values)]

    fact_ids = tokenizer([" " + f for f in facts], add_special_tokens=False)["input_ids"]
    fact_tokens = sum(len(ids) for ids in fact_ids)
    if context_tokens < fact_tokens:
        raise UserError(
            f"context_tokens={context_tokens} is too small to hold {num_facts} facts "
            f"({fact_tokens} tokens); raise context_tokens or lower num_facts."
        )
    sentences = _filler_sentences(rng, tokenizer=tokenizer, num_tokens=context_tokens - fact_tokens)
    for fact in facts:
        sentences.insert(rng.randint(0, len(sentences)), fact)

    target = rng.randrange(num_facts)
    return RetrievalTask(
        context=" ".join(sentences),
        question=QUESTION_TEMPLATE.format(key=keys[target]),
        answer=values[target],
        fact=facts[target],
        key=keys[target],
    )


def iter_tasks(
    *,
    context_tokens: int,
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    num_facts: int = DEFAULT_NUM_FACTS,
) -> Iterator[RetrievalTask]:
    """An endless, seeded stream of tasks (see :func:`make_task`)."""
    rng = random.Random(seed)
    while True:
        yield make_task(
            rng, context_tokens=context_tokens, tokenizer=tokenizer, num_facts=num_facts
        )


def sft_record(task: RetrievalTask) -> dict:
    """``{"messages": [user prompt, assistant reply]}`` for one task."""
    return {
        "messages": [
            {"role": "user", "content": format_prompt(task.context, task.question)},
            {"role": "assistant", "content": format_response(task)},
        ]
    }


def rl_record(task: RetrievalTask, *, record_id: str) -> dict:
    """``{"id", "context", "question", "answer", "choices", "source"}`` for one task;
    ``answer`` is the value string, ``choices`` None (free-form), ``source`` :data:`SOURCE`.
    The layout is ``data.rl_data``'s RL record."""
    return {
        "id": record_id,
        "context": task.context,
        "question": task.question,
        "answer": task.answer,
        "choices": None,
        "source": SOURCE,
    }


def make_sft_records(
    *,
    num_samples: int,
    context_tokens: int,
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    num_facts: int = DEFAULT_NUM_FACTS,
) -> list[dict]:
    """``num_samples`` SFT records ``{"messages": [{"role": "user", ...}, {"role":
    "assistant", ...}]}``; same seed, same records.

    ``context_tokens`` sizes the document only; the prompt wrapper, question and reply add
    about 70 tokens with the tiny tokenizer.
    """
    tasks = iter_tasks(
        context_tokens=context_tokens, tokenizer=tokenizer, seed=seed, num_facts=num_facts
    )
    return [sft_record(task) for task in itertools.islice(tasks, num_samples)]


def make_rl_records(
    *,
    num_samples: int,
    context_tokens: int,
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    num_facts: int = DEFAULT_NUM_FACTS,
    id_prefix: str = "kv",
) -> list[dict]:
    """``num_samples`` RL records (see :func:`rl_record`) with ids ``{id_prefix}-{index}``.

    Build the user prompt with :func:`format_prompt` so it matches what SFT trained on.
    """
    tasks = iter_tasks(
        context_tokens=context_tokens, tokenizer=tokenizer, seed=seed, num_facts=num_facts
    )
    return [
        rl_record(task, record_id=f"{id_prefix}-{index}")
        for index, task in enumerate(itertools.islice(tasks, num_samples))
    ]


def tokenizer_training_text(*, num_lines: int, seed: int) -> Iterator[str]:
    """Lines of task-like text (filler, facts, questions, prompts, replies, digits) to train a
    tokenizer on, without needing a tokenizer. Tags are left in; the trainer sees them as
    special tokens."""
    rng = random.Random(seed)
    for index in range(num_lines):
        key = f"{rng.choice(KEY_ADJECTIVES)} {rng.choice(KEY_NOUNS)}"
        value = str(rng.randint(VALUE_MIN, VALUE_MAX))
        fact = FACT_TEMPLATE.format(key=key, value=value)
        filler = " ".join(_filler_sentence(rng) for _ in range(3))
        kind = index % 4
        if kind == 0:
            yield f"{filler} {fact} {_filler_sentence(rng)}"
        elif kind == 1:
            yield format_prompt(filler, QUESTION_TEMPLATE.format(key=key))
        elif kind == 2:
            task = RetrievalTask(context="", question="", answer=value, fact=fact, key=key)
            yield f"system\nuser\nassistant\n{format_response(task)}"
        else:
            yield " ".join(str(rng.randint(0, 10**6)) for _ in range(8))
