"""Probe inputs for the real-model study: key-value retrieval prompts for a chat model, and a
held-out natural-text corpus for perplexity. All deterministic given a seed; nothing downloaded.
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
from dataclasses import dataclass

from megatron_longact.data.synthetic import make_task
from megatron_longact.errors import UserError

RETRIEVAL_SUFFIX = " Answer with the number only."
"""Appended to the synthetic task's question: a chat model then answers in a short sentence."""

# Perplexity text: the docstrings of a fixed list of standard-library modules, natural English
# prose that ships with Python. The models under study never trained on it as a separate set.
PERPLEXITY_MODULES = (
    "argparse", "collections", "csv", "email", "fractions", "heapq", "json", "logging",
    "pathlib", "pickle", "random", "shutil", "statistics", "subprocess", "tarfile", "textwrap",
    "threading", "unittest", "uuid", "zipfile",
)  # fmt: skip

OPEN_PROMPTS = (
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
    "Describe your favourite season and why.",
    "Give three tips for learning a new language.",
    "What happens when water boils?",
    "Tell me about the history of bread.",
)
"""Open-ended prompts whose long answers show repetition loops (paper Figure 6)."""


@dataclass(frozen=True, kw_only=True)
class RetrievalProbe:
    """One chat prompt (user message) and the value its answer must contain."""

    message: str
    answer: str


def retrieval_probes(
    tokenizer, *, num_samples: int, context_tokens: int, num_facts: int, seed: int
) -> list[RetrievalProbe]:
    """``num_samples`` key-value retrieval questions over ~``context_tokens``-token documents."""
    rng = random.Random(seed)
    probes = []
    for _ in range(num_samples):
        task = make_task(rng, context_tokens=context_tokens, tokenizer=tokenizer,
                         num_facts=num_facts)  # fmt: skip
        message = f"Document:\n{task.context}\n\nQuestion: {task.question}{RETRIEVAL_SUFFIX}"
        probes.append(RetrievalProbe(message=message, answer=task.answer))
    return probes


def retrieval_correct(response: str, answer: str) -> bool:
    """The first number in the response is the expected value."""
    numbers = re.findall(r"\d+", response)
    return bool(numbers) and numbers[0] == answer


def perplexity_text() -> str:
    """Module and public-member docstrings of :data:`PERPLEXITY_MODULES`, joined."""
    parts = []
    for name in PERPLEXITY_MODULES:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for _, member in sorted(vars(module).items()):
            if inspect.getmodule(member) is module and (
                inspect.isclass(member) or inspect.isfunction(member)
            ):
                parts.append(inspect.getdoc(member) or "")
    return "\n\n".join(p for p in parts if len(p) > 80)


def perplexity_windows(tokenizer, *, num_windows: int, window_tokens: int) -> list[list[int]]:
    """The first ``num_windows`` disjoint ``window_tokens``-token windows of that text."""
    ids = tokenizer(perplexity_text(), add_special_tokens=False)["input_ids"]
    if len(ids) < num_windows * window_tokens:
        raise UserError(
            f"perplexity text has {len(ids)} tokens, fewer than {num_windows} x {window_tokens}; "
            "lower --ppl-windows or --ppl-tokens"
        )
    return [ids[i * window_tokens : (i + 1) * window_tokens] for i in range(num_windows)]
