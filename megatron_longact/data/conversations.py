"""SFT rows as published -> chat messages ``[{"role", "content"}, ...]``.

Two layouts are read (docs/data.md):

- ours / OpenAI style: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}]}``;
- ShareGPT style, as AM-DeepSeek-R1-0528-Distilled (the paper's SFT set) publishes it:
  ``{"system": str, "conversations": [{"from": "human"|"assistant", "value": str, ...}]}``.
  ``from`` may also be ``gpt`` / ``user`` / ``system`` (other ShareGPT exports); extra keys such
  as ``info`` are ignored; a non-empty top-level ``system`` becomes the first message.

Rows come from any container ``records.read_records`` reads (JSONL, parquet, HF folder).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

from megatron_longact.data.jsonl import DataFormatError
from megatron_longact.data.records import read_records

# ShareGPT speaker -> chat role.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


def _sharegpt_messages(record: Mapping[str, Any], where: str) -> list[dict[str, str]]:
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise DataFormatError(
            f"{where}: field 'conversations' must be a non-empty list of {{'from', 'value'}} turns"
        )
    messages = []
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise DataFormatError(
            f"{where}: field 'system' must be a string, got {type(system).__name__}"
        )
    if system and system.strip():
        messages.append({"role": "system", "content": system})
    for index, turn in enumerate(turns):
        if not isinstance(turn, Mapping) or "from" not in turn or "value" not in turn:
            raise DataFormatError(
                f"{where}: conversations[{index}] must be an object with 'from' and 'value'"
            )
        role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise DataFormatError(
                f"{where}: conversations[{index}].from is {turn['from']!r}; expected one of "
                f"{sorted(SHAREGPT_ROLES)}"
            )
        messages.append({"role": role, "content": turn["value"]})
    return messages


def messages_of(record: Mapping[str, Any], *, where: str = "<record>") -> list[dict[str, str]]:
    """The chat messages of one SFT row (``messages``, or ShareGPT ``conversations``).

    Raises DataFormatError naming ``where`` when the row has neither layout or a malformed
    ShareGPT turn; the messages themselves are validated by ``chat.validate_messages``.
    """
    if "messages" in record:
        return record["messages"]
    if "conversations" in record:
        return _sharegpt_messages(record, where)
    raise DataFormatError(
        f"{where}: no 'messages' (role/content) or 'conversations' (ShareGPT from/value) field "
        f"(fields present: {sorted(record)}); see docs/data.md for the SFT layouts"
    )


def read_conversations(
    path: str | os.PathLike[str],
) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """Yield ``(location, messages)`` for every row of an SFT file or dataset folder."""
    for where, record in read_records(path):
        yield where, messages_of(record, where=where)
