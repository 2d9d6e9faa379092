"""Stop conditions of a rollout: stop tokens, stop strings, and the text the reward sees.

A stop string ends generation as soon as the decoded response contains it, with vLLM's
semantics (v0.10.2 ``vllm/v1/engine/detokenizer.py`` ``BaseIncrementalDetokenizer.update``
~91-142 and ``vllm/engine/output_processor/stop_checker.py`` ``check_stop_strings`` ~95-131):
after each token the new characters are searched for each stop string in list order, and with
``include_stop_str_in_output=True`` (what the engines request, so that format rewards see the
closing tag) the text is cut right after the first match. The token that completed the match is
the last response token.

The native engine finds stops in two ways, both batched:

* on the device, every step: the response ends with a stop token, or with the token sequence
  of a stop string as the tokenizer encodes it alone (:class:`StopTable`; no host sync);
* on the host, every few steps: the decoded tail of each row contains a stop string, which
  catches a string that is tokenized differently in context (``" </answer>"`` merged with a
  space, split differently after a digit...). :func:`first_text_stop` finds the exact token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from megatron_longact.errors import UserError

END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>")
"""Chat end-of-turn tokens that stop generation when the tokenizer has them."""
MAX_BYTES_PER_CHAR = 4
"""UTF-8: a character can be spread over up to 4 byte-level tokens."""
TAIL_MARGIN_TOKENS = 4
"""Extra tokens decoded left of a stop string (word-boundary and partial-byte effects)."""


@dataclass(frozen=True, kw_only=True)
class StopConditions:
    """What ends a response, resolved against one tokenizer."""

    token_ids: tuple[int, ...]
    """EOS, end-of-turn tokens and single-token stop strings."""
    strings: tuple[str, ...]
    """Every configured stop string, in config order (the decoded-text check)."""
    sequences: tuple[tuple[int, ...], ...]
    """Token sequences of the multi-token stop strings (the device check)."""


def resolve_stop_conditions(tokenizer, stop_strings: Sequence[str]) -> StopConditions:
    """The stop tokens and strings of ``stop_strings`` (``rl.stop_strings``) for ``tokenizer``.

    Raises ValueError naming a stop string that is empty, encodes to no tokens, or does not
    survive the tokenizer's encode/decode (``run_rl`` calls this at start, before any model is
    built, so a bad string fails there and not at step 1).
    """
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for token in END_OF_TURN_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    sequences = []
    for text in stop_strings:
        encoded = tokenizer.encode(text, add_special_tokens=False) if text else []
        if not encoded:
            raise UserError(
                f"rl.stop_strings: {text!r} encodes to no tokens; remove it or give a "
                "non-empty string"
            )
        decoded = tokenizer.decode(encoded, skip_special_tokens=False)
        if text not in decoded:
            # e.g. characters the vocabulary maps to <unk>: the stop could never be generated,
            # and its token sequence would stop on unrelated text.
            raise UserError(
                f"rl.stop_strings: {text!r} decodes back as {decoded!r} with this tokenizer, "
                "so no response can contain it; use a string the tokenizer can write"
            )
        if len(encoded) == 1:
            ids.add(encoded[0])
        else:
            sequences.append(tuple(encoded))
    return StopConditions(
        token_ids=tuple(sorted(ids)), strings=tuple(stop_strings), sequences=tuple(sequences)
    )


class StopTable:
    """Stop tokens and stop sequences as device tensors, matched against the newest tokens.

    ``table`` is [S, L] int64: each stop (a token is a sequence of one) right-aligned, left
    padded with -1 (matches anything). A row stops when its last L generated tokens equal one
    sequence's tokens where the sequence has them; generated-only, so a prompt never counts.
    """

    def __init__(self, token_ids: Sequence[int], sequences: Sequence[Sequence[int]], *,
                 device) -> None:  # fmt: skip
        stops = [(int(t),) for t in token_ids] + [tuple(s) for s in sequences]
        self.width = max((len(s) for s in stops), default=1)
        rows = [[-1] * (self.width - len(s)) + list(s) for s in stops] or [[-1]]
        self.table = torch.tensor(rows, dtype=torch.long, device=device)
        self.wildcard = self.table < 0
        self.empty = not stops

    def matches(self, window: torch.Tensor) -> torch.Tensor:
        """[b] bool: ``window`` [b, width] (the newest tokens, -2 where not generated) ends
        with one of the stops."""
        if self.empty:
            return torch.zeros(window.shape[0], dtype=torch.bool, device=window.device)
        equal = (window[:, None, :] == self.table[None]) | self.wildcard[None]
        return equal.all(dim=-1).any(dim=-1)


def tail_tokens(stop_strings: Sequence[str]) -> int:
    """Response tokens decoded to look for a stop string ending at the newest token."""
    longest = max((len(s) for s in stop_strings), default=0)
    return MAX_BYTES_PER_CHAR * longest + TAIL_MARGIN_TOKENS


def first_text_stop(
    decode: Callable[[list[int]], str],
    response: Sequence[int],
    *,
    stop_strings: Sequence[str],
    first: int,
    window: int,
) -> int | None:
    """Length of ``response`` at the first token ``>= first`` (0-based) whose new characters
    complete a stop string (vLLM's per-token check), or None. Decodes only the last ``window``
    tokens up to each candidate, and scans token by token only when the whole new stretch
    contains a stop string."""
    if not stop_strings or first >= len(response):
        return None
    stretch = decode(list(response[max(0, first - window) :]))
    if not any(s in stretch for s in stop_strings):
        return None
    for end in range(first + 1, len(response) + 1):
        begin = max(0, end - window)
        text = decode(list(response[begin:end]))
        new_chars = len(text) - len(decode(list(response[begin : end - 1])))
        if _stop_index(text, new_chars, stop_strings) is not None:
            return end
    return None


def _stop_index(text: str, new_char_count: int, stop_strings: Sequence[str]) -> int | None:
    """End index in ``text`` of the first stop string (list order) that ends within the last
    ``new_char_count`` characters, or None (vLLM's ``check_stop_strings`` search window)."""
    if new_char_count <= 0:
        return None
    for stop in stop_strings:
        index = text.find(stop, max(0, len(text) - new_char_count - len(stop) + 1))
        if index != -1:
            return index + len(stop)
    return None


def truncate_at_stop(text: str, *, new_char_count: int, stop_strings: Sequence[str]) -> str:
    """``text`` cut after the first stop string (list order) that ends within its last
    ``new_char_count`` characters; unchanged when none does. vLLM's ``check_stop_strings``
    with ``include_in_output=True`` (see the module docstring)."""
    end = _stop_index(text, new_char_count, stop_strings)
    return text if end is None else text[:end]


def response_text(tokenizer, response_ids: Sequence[int], *, stop_strings: Sequence[str]) -> str:
    """The response as the reward sees it: decoded with special tokens, cut after the stop
    string that ended it (what vLLM returns with ``include_stop_str_in_output=True``)."""
    text = tokenizer.decode(list(response_ids), skip_special_tokens=False)
    if not stop_strings or not response_ids:
        return text
    before = tokenizer.decode(list(response_ids[:-1]), skip_special_tokens=False)
    return truncate_at_stop(text, new_char_count=max(0, len(text) - len(before)),
                            stop_strings=stop_strings)  # fmt: skip
