"""What kind of answer a gold label is (multiple choice, number, free text): the one leaf that
the prompt builders (``data.prompts``) and the rewards (``rl.rewards``) both read, so a prompt
asks for exactly what its reward compares. Stdlib only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from megatron_longact.errors import UserError

DEFAULT_CHOICE_LETTERS = "ABCD"  # LongBench v2 has four options.

Gold = str | float | int | Sequence[str]

NUMBER_RE = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")
"""A number as answers write it: "1,234.50", "-3", "2.5e3", ".5"."""


def letter_regexes(letters: str) -> tuple[re.Pattern[str], re.Pattern[str], re.Pattern[str]]:
    """The official LongBench v2 patterns ("The correct answer is (C)", "... is C") and a bare
    option ("C", "(C)", "C.") over the choice ``letters``."""
    cls = "[" + re.escape(letters) + "]"
    return (
        re.compile(r"The correct answer is \((" + cls + r")\)"),
        re.compile(r"The correct answer is (" + cls + r")"),
        # A bare option inside answer tags: "C", "(C)", "C.", "C) text", "C: text".
        re.compile(r"^\(?(" + cls + r")(?:\)|\.|:|\s|$)"),
    )


def official_letter(text: str, *, letters: str = DEFAULT_CHOICE_LETTERS) -> str | None:
    """The letter of the first official LongBench v2 phrase in ``text`` ("The correct answer
    is (C)", then "The correct answer is C"), or None."""
    official_paren, official_bare, _ = letter_regexes(letters)
    for pattern in (official_paren, official_bare):
        match = pattern.search(text)
        if match:
            return match.group(1)
    return None


def gold_aliases(gold: Gold) -> list[str]:
    """The gold answer as a list of accepted strings (a number as its ``repr``)."""
    if isinstance(gold, str):
        return [gold]
    if isinstance(gold, (int, float)):
        return [repr(gold)]
    aliases = [str(g) for g in gold]
    if not aliases:
        raise UserError("gold answer is an empty list; give at least one alias")
    return aliases


def gold_choice_letter(gold: Gold, *, letters: str = DEFAULT_CHOICE_LETTERS) -> str:
    """The gold letter from "C", "(C)", or "The correct answer is (C)"; ValueError otherwise."""
    bare_letter = letter_regexes(letters)[2]
    for alias in gold_aliases(gold):
        text = alias.replace("*", "").strip()
        official = official_letter(text, letters=letters)
        if official is not None:
            return official
        match = bare_letter.match(text)
        if match and len(text) <= 3:
            return match.group(1)
    raise UserError(
        f"gold answer {gold!r} is not a choice letter in {letters!r}; write it as 'C' or "
        "'The correct answer is (C)', or score it with answer_qa"
    )


def infer_answer_type(gold: Gold, *, letters: str = DEFAULT_CHOICE_LETTERS) -> str:
    """ "mc" for a gold letter, "number" for a gold that is just a number, else "qa"."""
    try:
        gold_choice_letter(gold, letters=letters)
        return "mc"
    except ValueError:
        pass
    aliases = gold_aliases(gold)
    if all(NUMBER_RE.fullmatch(a.strip().replace("$", "").rstrip("%")) for a in aliases):
        return "number"
    return "qa"
