"""Laying RULER text out in a token budget: the sample record, budget fitting, depth placement.

RULER sizes every haystack by a binary search over the number of filler units, encoding the
full prompt each step. :func:`fit_count` finds the same largest count with a few interpolated
guesses instead (3-6 full encodes at 128k instead of ~17). :func:`place_at_depths` puts each
needle where the tokens before it are the requested fraction of the context's tokens (RULER
counts sentences; tokens are what a context window is made of).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from megatron_longact.errors import UserError
from megatron_longact.eval.tokens import TextCodec

# Filler units added to the empty haystack to measure the tokens one unit costs.
_PROBE_UNITS = 16
_MAX_FIT_STEPS = 40


@dataclass(frozen=True)
class RulerSample:
    """One generated RULER example.

    Attributes:
        task: RULER task name, e.g. "niah_multikey_2".
        index: sample index within the task (0-based).
        input: the prompt without the answer prefix (RULER's ``input``).
        answer_prefix: text the answer continues (RULER's ``answer_prefix``).
        outputs: reference strings (RULER's ``outputs``).
        num_tokens: tokens of ``input + answer_prefix`` plus the tokens reserved for the answer;
            at most ``max_seq_length`` (RULER's ``length``).
        max_seq_length: the budget the sample was generated for, in tokens.
        context_span: [start, end) character offsets of the haystack inside ``input``.
        needles: inserted needle sentences in order of appearance (NIAH; VT statements).
        depths: requested depth of each needle, as a fraction of the context's tokens.
    """

    task: str
    index: int
    input: str
    answer_prefix: str
    outputs: tuple[str, ...]
    num_tokens: int
    max_seq_length: int
    context_span: tuple[int, int] = (0, 0)
    needles: tuple[str, ...] = ()
    depths: tuple[float, ...] = ()

    @property
    def prompt(self) -> str:
        """``input + answer_prefix``: the prompt for a base (completion) model, as RULER's 'base'."""
        return self.input + self.answer_prefix


@dataclass(frozen=True)
class Filled:
    """A rendered prompt: ``input`` with the context at ``context_span``, plus needle metadata."""

    input: str
    answer_prefix: str
    context_span: tuple[int, int]
    needles: tuple[str, ...] = ()
    depths: tuple[float, ...] = ()

    @property
    def prompt(self) -> str:
        return self.input + self.answer_prefix


def render(template: str, answer_prefix: str, *, context: str, **fields: object) -> Filled:
    """Format ``template`` around ``context`` and record where the context landed."""
    head, sep, tail = template.partition("{context}")
    if not sep:
        raise ValueError("template has no {context} field")
    head_text = head.format(**fields)
    text = head_text + context + tail.format(**fields)
    return Filled(
        input=text,
        answer_prefix=answer_prefix.format(**fields),
        context_span=(len(head_text), len(head_text) + len(context)),
    )


def fit_count(
    build: Callable[[int], str],
    *,
    codec: TextCodec,
    budget: int,
    minimum: int = 0,
    task: str = "",
) -> int:
    """Largest ``n >= minimum`` whose ``build(n)`` has at most ``budget`` tokens (to within a unit).

    ``build`` must be deterministic and its token count non-decreasing in ``n``. Guesses are
    interpolated from the measured tokens per unit; the search stops when the room left is
    smaller than one unit's average cost or the bracket closes.

    Raises:
        ValueError: even ``build(minimum)`` exceeds the budget.
    """
    f_lo = codec.count(build(minimum))
    if f_lo > budget:
        raise UserError(
            f"RULER task {task or '?'}: the prompt without filler already has {f_lo} tokens, over the "
            f"budget of {budget}; raise max_seq_length"
        )
    lo, hi, f_hi = minimum, None, 0
    probe = minimum + _PROBE_UNITS
    f_probe = codec.count(build(probe))
    per_unit = max((f_probe - f_lo) / _PROBE_UNITS, 1e-6)
    if f_probe <= budget:
        lo, f_lo = probe, f_probe
    else:
        hi, f_hi = probe, f_probe
    for _ in range(_MAX_FIT_STEPS):
        if hi is not None and hi - lo <= 1:
            break
        if hi is None and budget - f_lo < per_unit:
            break
        if hi is not None:
            per_unit = max((f_hi - f_lo) / (hi - lo), 1e-6)
        guess = lo + max(1, int((budget - f_lo) / per_unit))
        if hi is not None:
            guess = min(guess, hi - 1)
        f_guess = codec.count(build(guess))
        if f_guess <= budget:
            lo, f_lo = guess, f_guess
        else:
            hi, f_hi = guess, f_guess
    return lo


def place_at_depths(
    units: Sequence[str],
    unit_tokens: Sequence[int],
    inserts: Sequence[str],
    insert_tokens: Sequence[int],
    depths: Sequence[float],
) -> list[str]:
    """Interleave ``inserts`` into ``units`` so each starts at its depth of the whole sequence.

    Inserts must be given in the order they should appear, with non-decreasing ``depths`` in
    [0, 1]. Insert j goes to the unit boundary b whose preceding tokens (units before b plus
    earlier inserts) are nearest to ``depths[j]`` times the total tokens of units and inserts.
    Token counts are per piece, so joiner tokens and merges make this accurate to a few tokens.
    """
    if not (len(inserts) == len(insert_tokens) == len(depths)):
        raise ValueError("inserts, insert_tokens and depths must have the same length")
    if any(not 0.0 <= d <= 1.0 for d in depths) or list(depths) != sorted(depths):
        raise ValueError(f"depths must be non-decreasing fractions in [0, 1], got {list(depths)}")
    cumulative = [0]
    for cost in unit_tokens:
        cumulative.append(cumulative[-1] + cost)
    total = cumulative[-1] + sum(insert_tokens)
    pieces: list[str] = []
    prev_boundary, inserted_before = 0, 0
    for text, cost, depth in zip(inserts, insert_tokens, depths):
        want = depth * total - inserted_before
        b = bisect.bisect_left(cumulative, want, lo=prev_boundary)
        if b > prev_boundary and (
            b == len(cumulative) or want - cumulative[b - 1] <= cumulative[b] - want
        ):
            b -= 1
        pieces.extend(units[prev_boundary:b])
        pieces.append(text)
        prev_boundary, inserted_before = b, inserted_before + cost
    pieces.extend(units[prev_boundary:])
    return pieces


class TokenCounter:
    """Cached ``codec.count`` for filler units, which repeat (noise) or recur across fit steps."""

    def __init__(self, codec: TextCodec) -> None:
        self._codec = codec
        self._cache: dict[str, int] = {}

    def __call__(self, text: str) -> int:
        cost = self._cache.get(text)
        if cost is None:
            cost = self._cache[text] = self._codec.count(text)
        return cost


class UnitStream:
    """A prefix-stable list of filler units: ``take(n)`` for a larger n extends, never reshuffles."""

    def __init__(self, make: Callable[[int], list[str]]) -> None:
        self._make = make
        self._units: list[str] = []

    def take(self, n: int) -> list[str]:
        if n > len(self._units):
            self._units.extend(self._make(n - len(self._units)))
        return self._units[:n]
