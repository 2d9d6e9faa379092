"""Chat conversations -> token ids with an assistant-only loss mask.

The text is the conversation rendered by the tokenizer's own chat template (see
:mod:`megatron_longact.data.chat_template`: Qwen3's and SmolLM2's ``<|im_start|>`` ChatML, the
tiny tokenizer's plain ChatML), so SFT samples look exactly like the RL and eval prompts. The
text is cut at the assistant spans and each piece is encoded on its own, so the mask boundaries
are exact: the prompt piece is encoded the way RL encodes a prompt, and the assistant piece the
way it is produced at inference, generated after the generation prompt. Pieces meet at special
tokens or after the role's newline, so for content that does not start with whitespace the ids
equal ``tokenizer.apply_chat_template(messages)``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from megatron_longact.data.chat_template import assistant_spans
from megatron_longact.data.conversations import read_conversations
from megatron_longact.data.jsonl import DataFormatError
from megatron_longact.errors import UserError

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
TRAINED_ROLE = "assistant"


@dataclass
class TokenizedSample:
    """One conversation as token ids.

    ``loss_mask[i]`` is 1 where ``input_ids[i]`` is a target the model learns to produce: an
    assistant turn as the template renders it after its generation prompt, through the closing
    end-of-turn token (``<|im_end|>``); 0 on system and user turns and on the template's
    scaffolding (``<|im_start|>assistant\\n``, the trailing ``\\n``, a default system prompt).
    """

    input_ids: list[int]
    loss_mask: list[int]

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


class SampleTooLongError(UserError):
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
        raise UserError(
            f"'messages' must be a non-empty list of {{'role', 'content'}} objects, got "
            f"{type(messages).__name__}."
        )
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise UserError(
                f"messages[{index}] must be an object with 'role' and 'content', got "
                f"{type(message).__name__}."
            )
        for key in ("role", "content"):
            if key not in message:
                raise UserError(f"messages[{index}] is missing field {key!r}.")
        if message["role"] not in ROLES:
            raise UserError(
                f"messages[{index}].role is {message['role']!r}; expected one of {list(ROLES)}."
            )
        if not isinstance(message["content"], str):
            raise UserError(
                f"messages[{index}].content must be a string, got "
                f"{type(message['content']).__name__}."
            )
    if not any(m["role"] == TRAINED_ROLE for m in messages):
        raise UserError(
            "conversation has no assistant turn, so nothing to train on; add an "
            "{'role': 'assistant', 'content': ...} message."
        )


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
    text, spans = assistant_spans(tokenizer, messages)
    input_ids: list[int] = []
    loss_mask: list[int] = []
    cursor = 0
    for start, end in [*spans, (len(text), len(text))]:
        for piece, trained in ((text[cursor:start], 0), (text[start:end], 1)):
            ids = tokenizer.encode(piece, add_special_tokens=False) if piece else []
            input_ids += ids
            loss_mask += [trained] * len(ids)
        cursor = end
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
