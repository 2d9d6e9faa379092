"""Rule-based rewards for long-context RL: a format reward plus an answer reward.

The paper (Eq. 12) scores a response y as ``r(y) = r_fmt(y) + r_ans(y)``, each 0 or 1, so the
reward lies in {0, 1, 2}. ``compute_reward("format_answer", response, gold)`` computes exactly
that; the other names in ``REWARD_FNS`` give the parts alone.

Answer extraction follows the public scorers:
- multiple choice (LongBench v2): the letter inside ``<answer>...</answer>``; otherwise, after
  removing ``*``, the official regexes ``The correct answer is \\(([A-D])\\)`` and then
  ``The correct answer is ([A-D])`` on the text after the last ``</think>``.
- free-form QA (Search-R1 / QwenLong-L1): the last ``<answer>`` block, else the text after the
  last "the answer is"; SQuAD normalization, then exact or whole-word substring match against
  any gold alias.
- numbers (DocMath style): the first number in the extracted answer, compared numerically.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from megatron_longact.data.answers import (
    DEFAULT_CHOICE_LETTERS,
    NUMBER_RE,
    Gold,
    gold_aliases,
    gold_choice_letter,
    infer_answer_type,
    letter_regexes,
    official_letter,
)
from megatron_longact.errors import UserError

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"
FORMAT_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

# End-of-sequence strings a detokenized response may end with (Qwen3, Llama, generic).
DEFAULT_EOS_STRINGS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>")
FORMAT_REWARD = 1.0  # r_fmt when the format holds (paper Eq. 12).
ANSWER_REWARD = 1.0  # r_ans when the answer matches (paper Eq. 12).
NUMBER_REL_TOL = 1e-6  # relative tolerance for numeric equality (parsing noise only).
NUMBER_ABS_TOL = 1e-9

_ANSWER_BLOCK = re.compile(re.escape(ANSWER_OPEN) + r"(.*?)" + re.escape(ANSWER_CLOSE), re.DOTALL)
_PUNCTUATION = frozenset(string.punctuation)
_THE_ANSWER_IS = re.compile(r"the answer is", re.IGNORECASE)


@dataclass(frozen=True)
class RewardResult:
    """The outcome of scoring one response.

    Attributes:
        score: the reward (0..2 for ``format_answer``, 0..1 for the single parts).
        format_ok: whether the response passed ``check_format``.
        answer_ok: whether the extracted answer matched the gold answer.
        extracted: the answer text that was compared (a letter for multiple choice), or None.
    """

    score: float
    format_ok: bool
    answer_ok: bool
    extracted: str | None


# ---------------------------------------------------------------------------------------------
# Format


def _strip_trailing_eos(text: str, eos_strings: Sequence[str]) -> str:
    text = text.rstrip()
    changed = True
    while changed:
        changed = False
        for eos in eos_strings:
            if eos and text.endswith(eos):
                text = text[: -len(eos)].rstrip()
                changed = True
    return text


def check_format(
    response: str,
    *,
    response_prefix: str = "",
    eos_strings: Sequence[str] = DEFAULT_EOS_STRINGS,
) -> bool:
    """Returns True when the response has the paper's think/answer format.

    The exact rule (all must hold on ``response_prefix + response``):
    1. Trailing end-of-sequence strings (``eos_strings``) and whitespace are removed first.
    2. Each of ``<think>``, ``</think>``, ``<answer>``, ``</answer>`` occurs exactly once.
    3. They occur in that order.
    4. Only whitespace comes before ``<think>`` and after ``</answer>``.
    5. The text inside ``<think>...</think>`` and inside ``<answer>...</answer>`` is non-empty
       after stripping whitespace.
    Any text may sit between ``</think>`` and ``<answer>`` (a short summary, say).

    Args:
        response: the generated text, detokenized with special tokens kept or dropped.
        response_prefix: text the prompt already ended with, e.g. ``"<think>\\n"`` when the chat
            template opens the think block itself; it counts as part of the response.
        eos_strings: end-of-sequence strings that may trail the response.
    """
    text = _strip_trailing_eos(response_prefix + response, eos_strings)
    if any(text.count(tag) != 1 for tag in FORMAT_TAGS):
        return False
    t_open, t_close, a_open, a_close = (text.index(tag) for tag in FORMAT_TAGS)
    if not t_open < t_close < a_open < a_close:
        return False
    if text[:t_open].strip() or text[a_close + len(ANSWER_CLOSE) :].strip():
        return False
    think = text[t_open + len(THINK_OPEN) : t_close]
    answer = text[a_open + len(ANSWER_OPEN) : a_close]
    return bool(think.strip()) and bool(answer.strip())


# ---------------------------------------------------------------------------------------------
# Extraction


def extract_tagged_answer(response: str) -> str | None:
    """Returns the stripped content of the last ``<answer>...</answer>`` block, or None."""
    blocks = _ANSWER_BLOCK.findall(response)
    return blocks[-1].strip() if blocks else None


def _after_think(response: str) -> str:
    """The text after the last ``</think>`` (QwenLong-L1), or all of it when there is none."""
    return response.rsplit(THINK_CLOSE, 1)[-1]


def extract_choice_letter(
    response: str, *, letters: str = DEFAULT_CHOICE_LETTERS, use_tags: bool = True
) -> str | None:
    """Extracts a multiple-choice letter from a response, or returns None.

    Order: (1) with ``use_tags``, the last ``<answer>`` block: the LongBench v2 regexes, then a
    bare letter at its start ("C", "(C)", "C. text"); (2) otherwise, after removing ``*``, the
    official LongBench v2 regexes ``The correct answer is \\(([A-D])\\)`` then
    ``The correct answer is ([A-D])`` (first match) on the text after the last ``</think>``.
    Letters are upper case only: a lone "a" is an article, not an option.
    """
    if use_tags:
        tagged = extract_tagged_answer(response)
        if tagged is not None:
            tagged = tagged.replace("*", "").strip()
            official = official_letter(tagged, letters=letters)
            if official is not None:
                return official
            match = letter_regexes(letters)[2].match(tagged)  # a bare option letter
            return match.group(1) if match else None
    return official_letter(_after_think(response).replace("*", ""), letters=letters)


def extract_free_answer(response: str) -> str | None:
    """Extracts a free-form answer: the last ``<answer>`` block, else what follows the last
    "the answer is" after the last ``</think>`` (up to the end, trailing "." removed)."""
    tagged = extract_tagged_answer(response)
    if tagged is not None:
        return tagged
    tail = _after_think(response).replace("*", "")
    parts = _THE_ANSWER_IS.split(tail)
    if len(parts) < 2:
        return None
    answer = parts[-1].strip().rstrip(".").strip()
    return answer or None


def normalize_squad(text: str) -> str:
    """SQuAD answer normalization: lower case, drop punctuation, drop the articles a/an/the,
    collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def parse_number(text: str) -> float | None:
    """Parses the first number in ``text`` ("1,234.50", "-3", "2.5e3", "$40", "15%"), or None.

    Thousands separators are removed; a percent sign is ignored (so "15%" equals 15).
    """
    match = NUMBER_RE.search(text.replace("$", ""))
    if match is None:
        return None
    try:
        return float(match.group(0).replace(",", ""))
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------
# Matching


def qa_match(
    prediction: str, gold: Gold, *, mode: Literal["exact", "substring"] = "substring"
) -> bool:
    """Whether a free-form prediction matches any gold alias after SQuAD normalization.

    ``exact``: normalized strings are equal. ``substring``: the normalized gold occurs in the
    normalized prediction on word boundaries ("paris" in "it is paris", not "1" in "1990").
    An empty normalized prediction never matches.
    """
    pred = normalize_squad(prediction)
    if not pred:
        return False
    for alias in gold_aliases(gold):
        ref = normalize_squad(alias)
        if not ref:
            continue
        if mode == "exact" and pred == ref:
            return True
        if mode == "substring" and f" {ref} " in f" {pred} ":
            return True
    return False


def number_match(prediction: str, gold: Gold) -> bool:
    """Whether the first number in ``prediction`` equals any gold number (within
    ``NUMBER_REL_TOL``); "1,000.0" equals "1000"."""
    pred = parse_number(prediction)
    if pred is None:
        return False
    for alias in gold_aliases(gold):
        ref = parse_number(alias)
        if ref is not None and math.isclose(
            pred, ref, rel_tol=NUMBER_REL_TOL, abs_tol=NUMBER_ABS_TOL
        ):
            return True
    return False


# ---------------------------------------------------------------------------------------------
# Reward functions (the registry)


def format_reward(
    response: str,
    gold: Gold | None = None,
    *,
    response_prefix: str = "",
    eos_strings: Sequence[str] = DEFAULT_EOS_STRINGS,
) -> RewardResult:
    """r_fmt alone: ``FORMAT_REWARD`` when ``check_format`` holds, else 0. ``gold`` is unused."""
    ok = check_format(response, response_prefix=response_prefix, eos_strings=eos_strings)
    return RewardResult(
        score=FORMAT_REWARD if ok else 0.0,
        format_ok=ok,
        answer_ok=False,
        extracted=extract_tagged_answer(response),
    )


def answer_mc_reward(
    response: str, gold: Gold, *, letters: str = DEFAULT_CHOICE_LETTERS
) -> RewardResult:
    """r_ans for multiple choice: 1 when the extracted letter equals the gold letter."""
    pred = extract_choice_letter(response, letters=letters)
    ok = pred is not None and pred == gold_choice_letter(gold, letters=letters)
    return RewardResult(
        score=ANSWER_REWARD if ok else 0.0, format_ok=False, answer_ok=ok, extracted=pred
    )


def answer_qa_reward(
    response: str, gold: Gold, *, mode: Literal["exact", "substring"] = "substring"
) -> RewardResult:
    """r_ans for free-form QA: 1 when ``qa_match`` holds for any gold alias."""
    pred = extract_free_answer(response)
    ok = pred is not None and qa_match(pred, gold, mode=mode)
    return RewardResult(
        score=ANSWER_REWARD if ok else 0.0, format_ok=False, answer_ok=ok, extracted=pred
    )


def answer_number_reward(response: str, gold: Gold) -> RewardResult:
    """r_ans for numeric answers: 1 when ``number_match`` holds."""
    pred = extract_free_answer(response)
    ok = pred is not None and number_match(pred, gold)
    return RewardResult(
        score=ANSWER_REWARD if ok else 0.0, format_ok=False, answer_ok=ok, extracted=pred
    )


AnswerType = Literal["auto", "mc", "qa", "number"]


def format_answer_reward(
    response: str,
    gold: Gold,
    *,
    answer_type: AnswerType = "auto",
    response_prefix: str = "",
    eos_strings: Sequence[str] = DEFAULT_EOS_STRINGS,
    letters: str = DEFAULT_CHOICE_LETTERS,
    mode: Literal["exact", "substring"] = "substring",
) -> RewardResult:
    """The paper's reward (Eq. 12): r_fmt + r_ans, in {0, 1, 2}.

    The two parts are independent: a right answer without the tags still earns r_ans.
    ``answer_type="auto"`` picks multiple choice for a gold letter, numeric for a numeric gold,
    free-form QA otherwise (``infer_answer_type``); force it for data where that guess is wrong.
    """
    fmt = format_reward(response, response_prefix=response_prefix, eos_strings=eos_strings)
    kind = infer_answer_type(gold, letters=letters) if answer_type == "auto" else answer_type
    if kind == "mc":
        ans = answer_mc_reward(response, gold, letters=letters)
    elif kind == "number":
        ans = answer_number_reward(response, gold)
    elif kind == "qa":
        ans = answer_qa_reward(response, gold, mode=mode)
    else:
        raise UserError(f"answer_type={answer_type!r}; use one of auto, mc, qa, number")
    return RewardResult(
        score=fmt.score + ans.score,
        format_ok=fmt.format_ok,
        answer_ok=ans.answer_ok,
        extracted=ans.extracted,
    )


RewardFn = Callable[..., RewardResult]

REWARD_FNS: dict[str, RewardFn] = {
    "format": format_reward,
    "answer_mc": answer_mc_reward,
    "answer_qa": answer_qa_reward,
    "answer_number": answer_number_reward,
    "format_answer": format_answer_reward,
}


def compute_reward(name: str, response: str, gold: Gold, **kwargs: object) -> RewardResult:
    """Scores one response with the reward function registered as ``name`` in ``REWARD_FNS``.

    ``kwargs`` go to that function (e.g. ``answer_type="mc"``, ``response_prefix="<think>\\n"``).
    The paper's reward is ``"format_answer"``.
    """
    fn = REWARD_FNS.get(name)
    if fn is None:
        raise UserError(f"unknown reward '{name}'; valid names: {', '.join(sorted(REWARD_FNS))}")
    return fn(response, gold, **kwargs)
