"""ChatML conversations -> token ids with an assistant-only loss mask.

The text is exactly the tiny tokenizer's chat template (Qwen-style ChatML, no default system
prompt): ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message. Each piece is encoded
separately so the mask boundaries are exact; pieces meet at special tokens or after the
role's newline, so for content that does not start with whitespace the ids equal
``tokenizer.apply_chat_template(messages)``. Encoding the assistant content on its own is also
how it is produced at inference: generated after the ``<|im_start|>assistant\\n`` prompt.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from megatron_longact.data.conversations import read_conversations
from megatron_longact.data.jsonl import DataFormatError
from megatron_longact.data.tokenizer import IM_END, IM_START

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
TRAINED_ROLE = "assistant"


@dataclass
class TokenizedSample:
    """One conversation as token ids.

    ``loss_mask[i]`` is 1 where ``input_ids[i]`` is a target the model learns to produce:
    assistant content tokens and the assistant turn's closing ``<|im_end|>``; 0 on system and
    user turns and on the ``<|im_start|>role\\n`` / trailing ``\\n`` scaffolding.
    """

    input_ids: list[int]
    loss_mask: list[int]

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


class SampleTooLongError(ValueError):
    """A conversation has more tokens than ``max_length``."""

    def __init__(self, num_tokens: int, max_length: int):
        super().__init__(
            f"conversation has {num_tokens} tokens, more than max_length={max_length}; raise "
            f"max_length or shorten the sample."
        )
        self.num_tokens = num_tokens
        self.max_length = max_length


def validate_messages(messages: Any) -> None:
    """Raise ``ValueError`` naming the message and field when ``messages`` is not a list of
    ``{"role": system|user|assistant, "content": str}`` with at least one assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(
            f"'messages' must be a non-empty list of {{'role', 'content'}} objects, got "
            f"{type(messages).__name__}."
        )
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(
                f"messages[{index}] must be an object with 'role' and 'content', got "
                f"{type(message).__name__}."
            )
        for key in ("role", "content"):
            if key not in message:
                raise ValueError(f"messages[{index}] is missing field {key!r}.")
        if message["role"] not in ROLES:
            raise ValueError(
                f"messages[{index}].role is {message['role']!r}; expected one of {list(ROLES)}."
            )
        if not isinstance(message["content"], str):
            raise ValueError(
                f"messages[{index}].content must be a string, got "
                f"{type(message['content']).__name__}."
            )
    if not any(m["role"] == TRAINED_ROLE for m in messages):
        raise ValueError(
            "conversation has no assistant turn, so nothing to train on; add an "
            "{'role': 'assistant', 'content': ...} message."
        )


def _single_token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(
            f"tokenizer {tokenizer.name_or_path!r} has no single token for {token!r}; ChatML "
            f"conversations need a tokenizer with <|im_start|> and <|im_end|> (e.g. Qwen's or "
            f"the tiny one from tools/build_tiny_tokenizer.py)."
        )
    return ids[0]


def tokenize_conversation(
    messages: Sequence[dict[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
) -> TokenizedSample:
    """Tokenize a ChatML conversation with an assistant-only loss mask.

    Every assistant turn is trained (multi-turn conversations train all of them).

    Raises:
        ValueError: malformed ``messages`` (see :func:`validate_messages`); the caller adds
            the file and line.
        SampleTooLongError: more than ``max_length`` tokens. Samples are never truncated:
            a cut reasoning trace or a missing answer teaches the wrong thing.
    """
    if max_length <= 0:
        raise ValueError(f"max_length={max_length} must be positive.")
    validate_messages(messages)
    im_start_id = _single_token_id(tokenizer, IM_START)
    im_end_id = _single_token_id(tokenizer, IM_END)
    newline_ids = tokenizer.encode("\n", add_special_tokens=False)

    input_ids: list[int] = []
    loss_mask: list[int] = []
    for message in messages:
        trained = int(message["role"] == TRAINED_ROLE)
        header = [im_start_id, *tokenizer.encode(message["role"] + "\n", add_special_tokens=False)]
        body = [*tokenizer.encode(message["content"], add_special_tokens=False), im_end_id]
        input_ids += header + body + newline_ids
        loss_mask += [0] * len(header) + [trained] * len(body) + [0] * len(newline_ids)
    if len(input_ids) > max_length:
        raise SampleTooLongError(len(input_ids), max_length)
    return TokenizedSample(input_ids=input_ids, loss_mask=loss_mask)


@dataclass
class SftDataset:
    """Tokenized SFT samples from one file; behaves as a read-only list of samples.

    ``num_dropped`` counts records skipped for being longer than ``max_length``; ``dropped_at``
    holds their locations ("file:line" or "file: row i").
    """

    samples: list[TokenizedSample]
    num_dropped: int = 0
    source: str = ""
    dropped_at: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> TokenizedSample:
        return self.samples[index]

    def __iter__(self) -> Iterator[TokenizedSample]:
        return iter(self.samples)


def load_sft_dataset(
    path: str | os.PathLike[str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
) -> SftDataset:
    """Read SFT conversations and tokenize every one.

    ``path``: JSONL, a JSON list, parquet or a Hugging Face dataset folder
    (``records.read_records``) of ``{"messages": [...]}`` rows or ShareGPT rows
    (``{"system", "conversations": [{"from", "value"}]}``, see ``conversations.messages_of``).
    Records longer than ``max_length`` tokens are dropped, counted in ``num_dropped`` (their
    locations in ``dropped_at``) and reported in one logged warning.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataFormatError: a row is unreadable, has neither layout or holds malformed messages;
            the message names the file and the line or row.
    """
    samples: list[TokenizedSample] = []
    dropped_at: list[str] = []
    for where, messages in read_conversations(path):
        try:
            samples.append(tokenize_conversation(messages, tokenizer, max_length=max_length))
        except SampleTooLongError:
            dropped_at.append(where)
        except ValueError as err:
            raise DataFormatError(f"{where}: field 'messages': {err}") from err
    if dropped_at:
        logger.warning(
            "Dropped %d of %d SFT samples from %s longer than max_length=%d (first at %s).",
            len(dropped_at),
            len(dropped_at) + len(samples),
            path,
            max_length,
            dropped_at[0],
        )
    return SftDataset(
        samples=samples,
        num_dropped=len(dropped_at),
        source=os.fspath(path),
        dropped_at=dropped_at,
    )
