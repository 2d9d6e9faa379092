"""Token counting and middle truncation behind one small codec, so no eval module needs a tokenizer class.

A :class:`TextCodec` is a pair of plain callables. It is built from a Hugging Face tokenizer
(anything with ``encode``/``decode``) or from two functions, e.g. a whitespace split in tests.
Only ``len(encode(text))`` is ever used for budgets, so token ids may be of any type.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

Encode = Callable[[str], Sequence[Any]]
Decode = Callable[[Sequence[Any]], str]


@dataclass(frozen=True)
class TextCodec:
    """Text <-> tokens. ``decode`` is only needed for truncation."""

    encode: Encode
    decode: Decode | None = None

    def count(self, text: str) -> int:
        """Number of tokens in ``text`` (no special tokens added)."""
        return len(self.encode(text))


def as_codec(
    tokenizer: Any = None, *, encode: Encode | None = None, decode: Decode | None = None
) -> TextCodec:
    """Build a codec from an HF-style tokenizer, an existing codec, or ``encode``/``decode``.

    HF tokenizers encode without special tokens and decode with ``skip_special_tokens=True``, as
    LongBench's and InfiniteBench's official truncation does (Qwen adds no BOS either way).
    """
    if isinstance(tokenizer, TextCodec):
        return tokenizer
    if tokenizer is not None:
        if not (hasattr(tokenizer, "encode") and hasattr(tokenizer, "decode")):
            raise ValueError(
                f"tokenizer of type {type(tokenizer).__name__} has no encode/decode; pass an HF "
                "tokenizer, a TextCodec, or encode=/decode= callables"
            )
        return TextCodec(
            encode=lambda text: tokenizer.encode(text, add_special_tokens=False),
            decode=lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True),
        )
    if encode is None:
        raise ValueError("pass a tokenizer or an encode= callable (and decode= to truncate)")
    return TextCodec(encode=encode, decode=decode)


def truncate_middle(text: str, *, max_tokens: int, codec: TextCodec) -> str:
    """Keep the first ``max_tokens // 2`` and the last ``max_tokens - max_tokens // 2`` tokens.

    This is the official rule of LongBench v2 (``ids[:n//2] + ids[-n//2:]``) and InfiniteBench
    (``truncate_input(..., manner="middle")``): the instruction head and the question tail survive,
    the middle of the document goes. Text already within budget is returned unchanged.
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    ids = list(codec.encode(text))
    if len(ids) <= max_tokens:
        return text
    if codec.decode is None:
        raise ValueError("truncation needs a decode callable; build the codec with decode=")
    head = max_tokens // 2
    tail = max_tokens - head
    return codec.decode(ids[:head] + ids[len(ids) - tail :])


def budget_codec(tokenizer: Any, max_prompt_tokens: int | None) -> TextCodec | None:
    """The codec that middle-truncation needs, or None when prompts keep full contexts.

    Raises ValueError when a token budget is given without a tokenizer.
    """
    if max_prompt_tokens is None:
        return None
    if tokenizer is None:
        raise ValueError(
            f"max_prompt_tokens={max_prompt_tokens} needs tokenizer= (HF tokenizer or TextCodec); "
            "pass max_prompt_tokens=None to keep full contexts"
        )
    return as_codec(tokenizer)
