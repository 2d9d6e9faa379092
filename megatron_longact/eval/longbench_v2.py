"""LongBench v2 (Bai et al. 2025): loader, official prompts, answer extraction, Table 1 scores.

Rules follow THUDM/LongBench ``pred.py``, ``prompts/*.txt`` and ``result.py``:

* prompts: ``0shot.txt`` (answer directly), ``0shot_cot.txt`` then ``0shot_cot_ans.txt`` (CoT is
  two queries: the reasoning, then the answer given the reasoning without the document). Fields
  are substituted with ``str.replace`` after ``.strip()``, context first.
* truncation: the whole prompt is cut in the middle to ``max_prompt_tokens`` (official default
  120,000 for Qwen3-8B in ``config/model2maxlen.json``).
* extraction: remove ``*``, then ``The correct answer is \\(([A-D])\\)``, then
  ``The correct answer is ([A-D])``; else no answer (wrong, or 0.25 when ``compensated``).
* scores: accuracy overall, by difficulty (easy/hard) and by length (short < 32k words,
  medium 32k-128k, long > 128k) -- the columns of the paper's Table 1.

Our additions: a prompt style "answer_tag" asking for ``<think>...</think><answer>X</answer>``
(the format of our SFT/RL data); the extractor accepts the last ``<answer>`` after the official
regexes (before them for "answer_tag", as the RL reward does); and reasoning before the last
``</think>`` is dropped first, as a vLLM reasoning parser does before the official scorer sees
the text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from megatron_longact.data.records import read_records
from megatron_longact.errors import UserError
from megatron_longact.eval.metrics import strip_thinking
from megatron_longact.eval.suite import Record, Suite, mean_percent
from megatron_longact.eval.tokens import TextCodec, budget_codec, truncate_middle

FIELDS = (
    "_id",
    "domain",
    "sub_domain",
    "difficulty",
    "length",
    "question",
    "choice_A",
    "choice_B",
    "choice_C",
    "choice_D",
    "answer",
    "context",
)
CHOICES = ("A", "B", "C", "D")
DIFFICULTIES = ("easy", "hard")
LENGTHS = ("short", "medium", "long")
TABLE1_COLUMNS = ("Overall", "Easy", "Hard", "Short", "Medium", "Long")

# LongBench's config/model2maxlen.json value for qwen3-8b (and most 128k models).
DEFAULT_MAX_PROMPT_TOKENS = 120_000
# Official generation lengths (pred.py): 128 new tokens for a direct answer, 1024 for CoT.
MAX_NEW_TOKENS = 128
MAX_NEW_TOKENS_COT = 1024
# Accuracy credited to an unparsable answer when result.py's `compensated` is on (1 of 4).
COMPENSATED_CREDIT = 0.25

TEMPLATE_0SHOT = (
    "Please read the following text and answer the question below.\n\n<text>\n$DOC$\n</text>\n\n"
    "What is the correct answer to this question: $Q$\nChoices:\n(A) $C_A$\n(B) $C_B$\n(C) $C_C$\n"
    "(D) $C_D$\n\n"
    'Format your response as follows: "The correct answer is (insert answer here)".'
)
TEMPLATE_0SHOT_COT = (
    "Please read the following text and answer the questions below.\n\n<text>\n$DOC$\n</text>\n\n"
    "What is the correct answer to this question: $Q$\nChoices:\n(A) $C_A$\n(B) $C_B$\n(C) $C_C$\n"
    "(D) $C_D$\n\nLet’s think step by step:"
)
TEMPLATE_0SHOT_COT_ANS = (
    "Please read the following text and answer the questions below.\n\n"
    "The text is too long and omitted here.\n\n"
    "What is the correct answer to this question: $Q$\nChoices:\n(A) $C_A$\n(B) $C_B$\n(C) $C_C$\n"
    "(D) $C_D$\n\nLet’s think step by step: $COT$\n\n"
    "Based on the above, what is the single, most likely answer choice? "
    'Format your response as follows: "The correct answer is (insert answer here)".'
)
# Ours: the official 0-shot prompt with the answer asked for inside <answer> tags.
TEMPLATE_ANSWER_TAG = (
    "Please read the following text and answer the question below.\n\n<text>\n$DOC$\n</text>\n\n"
    "What is the correct answer to this question: $Q$\nChoices:\n(A) $C_A$\n(B) $C_B$\n(C) $C_C$\n"
    "(D) $C_D$\n\n"
    "Think inside <think></think>, then give the letter of the correct choice inside "
    "<answer></answer>, for example <answer>A</answer>."
)

PromptStyle = Literal["0shot", "cot", "answer_tag"]
_TEMPLATES: dict[str, str] = {
    "0shot": TEMPLATE_0SHOT,
    "cot": TEMPLATE_0SHOT_COT,
    "answer_tag": TEMPLATE_ANSWER_TAG,
}

_OFFICIAL_PAREN = re.compile(r"The correct answer is \(([A-D])\)")
_OFFICIAL_BARE = re.compile(r"The correct answer is ([A-D])")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_TAG_LETTER = re.compile(r"^\s*\(?([A-D])\)?(?:[\s.:)]|$)")


@dataclass(frozen=True)
class LongBenchV2Sample:
    """One multiple-choice question; ``length`` is the word-count bucket, not a token count."""

    _id: str
    domain: str
    sub_domain: str
    difficulty: str
    length: str
    question: str
    choice_A: str
    choice_B: str
    choice_C: str
    choice_D: str
    answer: str
    context: str


# ----------------------------------------------------------------------------- loading
def load_longbench_v2(path: str | Path) -> list[LongBenchV2Sample]:
    """Read LongBench v2 from a local ``data.json`` (a JSON list), JSONL, parquet or a Hugging
    Face dataset folder (``data.records.read_records``).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a record misses a field or has an invalid answer/difficulty/length; the
            message names the file, the record index and ``_id``, and the field.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"LongBench v2 file {path} not found; download data.json of THUDM/LongBench-v2 and "
            "pass its local path"
        )
    samples = []
    for location, record in read_records(path):
        where = f"{location} (_id={record.get('_id', '?')})"
        for field in FIELDS:
            if field not in record:
                raise UserError(
                    f"{where}: missing field '{field}'; each record needs {', '.join(FIELDS)}"
                )
            if not isinstance(record[field], str):
                raise UserError(
                    f"{where}: field '{field}' must be a string, got {type(record[field]).__name__}"
                )
        for field, allowed in (
            ("answer", CHOICES),
            ("difficulty", DIFFICULTIES),
            ("length", LENGTHS),
        ):
            if record[field] not in allowed:
                raise UserError(
                    f"{where}: field '{field}' is {record[field]!r}, expected one of {allowed}"
                )
        samples.append(LongBenchV2Sample(**{field: record[field] for field in FIELDS}))
    return samples


# ----------------------------------------------------------------------------- prompts
def _fill(template: str, sample: LongBenchV2Sample, *, context: str, cot: str | None = None) -> str:
    # Same substitution order as pred.py; context first so '$Q$' inside a document stays literal.
    prompt = (
        template.replace("$DOC$", context.strip())
        .replace("$Q$", sample.question.strip())
        .replace("$C_A$", sample.choice_A.strip())
        .replace("$C_B$", sample.choice_B.strip())
        .replace("$C_C$", sample.choice_C.strip())
        .replace("$C_D$", sample.choice_D.strip())
    )
    return prompt.replace("$COT$", cot) if cot is not None else prompt


def build_prompt(
    sample: LongBenchV2Sample,
    *,
    style: PromptStyle = "0shot",
    max_prompt_tokens: int | None = None,
    codec: TextCodec | None = None,
) -> str:
    """The first-turn prompt; with a budget, the whole prompt is middle-truncated (official rule).

    Args:
        style: "0shot" (official direct answer), "cot" (official CoT, first turn), or
            "answer_tag" (ours).
        max_prompt_tokens: token budget of the prompt; None keeps the full context.
        codec: tokenizer codec, required with a budget (see :func:`tokens.as_codec`).
    """
    if style not in _TEMPLATES:
        raise UserError(f"style must be one of {sorted(_TEMPLATES)}, got {style!r}")
    prompt = _fill(_TEMPLATES[style], sample, context=sample.context)
    if max_prompt_tokens is None:
        return prompt
    if codec is None:
        raise ValueError("max_prompt_tokens needs a codec= (e.g. tokens.as_codec(hf_tokenizer))")
    return truncate_middle(prompt, max_tokens=max_prompt_tokens, codec=codec)


def build_cot_answer_prompt(sample: LongBenchV2Sample, cot_response: str) -> str:
    """Official CoT second turn: the question, choices and the reasoning, without the document."""
    return _fill(TEMPLATE_0SHOT_COT_ANS, sample, context="", cot=cot_response.strip())


# ----------------------------------------------------------------------------- extraction
def extract_choice(response: str, *, tag_first: bool = False) -> str | None:
    """The chosen letter A-D, or None.

    Reasoning before the last ``</think>`` is dropped and ``*`` removed. Then, in order:
    the official regexes ``The correct answer is (X)`` and ``The correct answer is X`` (first
    match, as pred.py), and our last ``<answer>...</answer>`` whose content starts with a letter
    (``B``, ``(B)``, ``B.``, ``B) text``). ``tag_first`` tries the tag before the regexes, as the
    RL reward does for the answer-tag format.
    """
    text = strip_thinking(response).replace("*", "")

    def official() -> str | None:
        for pattern in (_OFFICIAL_PAREN, _OFFICIAL_BARE):
            match = pattern.search(text)
            if match:
                return match.group(1)
        return None

    def tagged() -> str | None:
        tags = _ANSWER_TAG.findall(text)
        match = _TAG_LETTER.match(tags[-1]) if tags else None
        return match.group(1) if match else None

    first, second = (tagged, official) if tag_first else (official, tagged)
    return first() or second()


# ----------------------------------------------------------------------------- scoring
def score_sample(sample: LongBenchV2Sample, response: str, *, tag_first: bool = False) -> Record:
    """Per-sample record: the extracted letter, the judgement and the split labels."""
    pred = extract_choice(response, tag_first=tag_first)
    return {
        "pred": pred,
        "answer": sample.answer,
        "judge": pred == sample.answer,
        "difficulty": sample.difficulty,
        "length": sample.length,
        "domain": sample.domain,
    }


def aggregate(records: list[Record], *, compensated: bool = False) -> dict[str, float]:
    """Accuracy (%) overall, by difficulty and by length: the columns of Table 1.

    With ``compensated`` an unparsable answer earns 0.25 (result.py's option, off by default).
    """

    def acc(record: Record) -> float:
        if compensated and record["pred"] is None:
            return COMPENSATED_CREDIT
        return float(record["judge"])

    def split(key: str, value: str) -> list[float]:
        return [acc(r) for r in records if r[key] == value]

    return {
        "Overall": mean_percent([acc(r) for r in records]),
        "Easy": mean_percent(split("difficulty", "easy")),
        "Hard": mean_percent(split("difficulty", "hard")),
        "Short": mean_percent(split("length", "short")),
        "Medium": mean_percent(split("length", "medium")),
        "Long": mean_percent(split("length", "long")),
        "num_samples": float(len(records)),
        "num_unparsed": float(sum(r["pred"] is None for r in records)),
    }


def make_suite(
    *,
    style: PromptStyle = "0shot",
    max_prompt_tokens: int | None = DEFAULT_MAX_PROMPT_TOKENS,
    tokenizer: Any = None,
    compensated: bool = False,
    name: str | None = None,
) -> Suite[LongBenchV2Sample]:
    """A runner suite. ``tokenizer`` (HF tokenizer or TextCodec) is needed when a budget is set.

    "cot" runs the official two-turn CoT; the runner then needs 1024 new tokens on the first
    turn (``MAX_NEW_TOKENS_COT``) -- the generation budget is the backend's business.
    """
    codec = budget_codec(tokenizer, max_prompt_tokens)
    return Suite(
        name=name or f"longbench_v2_{style}",
        sample_id=lambda s: s._id,
        build_prompt=lambda s: build_prompt(
            s, style=style, max_prompt_tokens=max_prompt_tokens, codec=codec
        ),
        score_sample=lambda s, r: score_sample(s, r, tag_first=style == "answer_tag"),
        aggregate=lambda records: aggregate(records, compensated=compensated),
        followup_prompt=build_cot_answer_prompt if style == "cot" else None,
    )
