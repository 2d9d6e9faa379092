"""InfiniteBench (Zhang et al. 2024): the six tasks of the paper's Table 3.

Rules follow OpenBMB/InfiniteBench ``src/eval_utils.py`` (data files, ``get_answer``,
``create_prompt``, middle truncation), ``src/prompt.py`` (templates) and
``src/compute_scores.py`` (per-task scorers):

========  =======================  =================================================
column    file                     score of one prediction
========  =======================  =================================================
Re.Pa     passkey.jsonl            first integer in the prediction == answer
Re.Nu     number_string.jsonl      first integer in the prediction == answer
En.Sum    longbook_sum_eng.jsonl   ROUGE-Lsum F (max over references)
En.QA     longbook_qa_eng.jsonl    token F1 after SQuAD normalization (max over refs)
Zh.QA     longbook_qa_chn.jsonl    character F1 after Chinese normalization
En.MC     longbook_choice_eng.jsonl  letter or option text, official prefix rules
========  =======================  =================================================

Two template sets: "chat" is the official ``gpt4_templates`` (instructions only, for chat
models), "base" the official ``yarn_mistral_templates`` (ends in an answer prefix). Chat models
get the official system turn ``CHAT_SYSTEM_MESSAGE`` (``eval_utils.py:269-275`` ``create_msgs``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from megatron_longact.data.records import read_records
from megatron_longact.errors import UserError
from megatron_longact.eval.metrics import (
    first_int,
    rouge_lsum,
    strip_thinking,
    token_f1,
    zh_char_f1,
)
from megatron_longact.eval.suite import Record, Suite, mean_percent
from megatron_longact.eval.tokens import TextCodec, budget_codec, truncate_middle

# Task file stem -> the paper's Table 3 column.
TASK_COLUMNS: dict[str, str] = {
    "passkey": "Re.Pa",
    "number_string": "Re.Nu",
    "longbook_sum_eng": "En.Sum",
    "longbook_qa_eng": "En.QA",
    "longbook_qa_chn": "Zh.QA",
    "longbook_choice_eng": "En.MC",
}
TASKS = tuple(TASK_COLUMNS)
TABLE3_COLUMNS = (*TASK_COLUMNS.values(), "Avg.")
OPTION_LETTERS = "ABCD"
REQUIRED_FIELDS = ("id", "context", "input", "answer")

# Official max new tokens per task (eval_utils.DATA_NAME_TO_MAX_NEW_TOKENS).
MAX_NEW_TOKENS: dict[str, int] = {
    "passkey": 6,
    "number_string": 12,
    "longbook_sum_eng": 1200,
    "longbook_qa_eng": 40,
    "longbook_qa_chn": 40,
    "longbook_choice_eng": 40,
}
# Official prompt budget: 128k minus 1,000 tokens left for the system message (create_msgs).
DEFAULT_MAX_PROMPT_TOKENS = 128_000 - 1_000
# The official chat models' system turn, verbatim (no final period; eval_utils.py:272 at 88b3daa).
CHAT_SYSTEM_MESSAGE = "You are a helpful assistant"

_MC = (
    "Read the book and answer the question.\n\n{context}\n\nQuestion: {question}\n\n"
    "Only one of the following options is correct, tell me the answer using one single letter "
    "(A, B, C, or D). Don't say anything else.\nA. {OPTION_A}\nB. {OPTION_B}\nC. {OPTION_C}\n"
    "D. {OPTION_D}"
)
CHAT_TEMPLATES: dict[str, str] = {
    "passkey": (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
        "them. I will quiz you about the important information there.\n\n{context}\n\n{input}"
    ),
    "number_string": (
        "There is an important info hidden inside a lot of irrelevant text. Find it. I will quiz "
        "you about the important information there.\n\n{context}\n\n{input}"
    ),
    "longbook_sum_eng": "Summarize the following book.\n\n{context}",
    "longbook_qa_eng": "Read the book below and answer a question.\n\n{context}\n\nQuestion: {question}\n\nBe very concise.",
    "longbook_qa_chn": "请根据以下书籍回答我的问题。\n\n{context}\n\n问题：{question}\n请尽量简短地回答。",
    "longbook_choice_eng": _MC,
}
BASE_TEMPLATES: dict[str, str] = {
    "passkey": (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
        "it. I will quiz you about the important information.\n\n{context}\n\n{input}\n\nThe pass key is"
    ),
    "number_string": (
        "There is an important info hidden inside a lot of irrelevant text. Find it. I will quiz "
        "you about the important information there.\n\n{context}\n\n{input}\n\nThe sequence of digits is"
    ),
    "longbook_sum_eng": "Summarize the book below.\n\n{context}\n\nSummary:",
    "longbook_qa_eng": (
        "Read the book and answer the question. Be very concise in your answer.\n\n{context}\n\n"
        "Question: {question}\nAnswer:"
    ),
    "longbook_qa_chn": "阅读以下书籍然后回答问题。\n\n{context}\n\n问题：{question}\n答案：",
    "longbook_choice_eng": (
        "Read the book and answer the question.\n\n{context}\n\nQuestion: {question}\nA. {OPTION_A}\n"
        "B. {OPTION_B}\nC. {OPTION_C}\nD. {OPTION_D}\n\nThe letter of the correct answer is"
    ),
}
TemplateSet = Literal["chat", "base"]
_TEMPLATE_SETS = {"chat": CHAT_TEMPLATES, "base": BASE_TEMPLATES}


@dataclass(frozen=True)
class InfiniteBenchSample:
    """One example. ``answer`` is always a list; for En.MC it is [option text, letter]."""

    task: str
    id: str
    context: str
    input: str
    answer: tuple[str, ...]
    options: tuple[str, ...] = ()


# ----------------------------------------------------------------------------- loading
def _mc_answer(answer: list[str], options: list[str], where: str) -> tuple[str, ...]:
    """Official get_answer for choices: [text] -> [text, letter]; [text, letter] kept."""
    if len(answer) == 2 and answer[1] in OPTION_LETTERS:
        return tuple(answer)
    if len(answer) == 1 and answer[0] in options:
        return (answer[0], OPTION_LETTERS[options.index(answer[0])])
    raise UserError(
        f"{where}: field 'answer' {answer!r} must be one of the 'options' texts or [text, letter]"
    )


def _parse_record(record: Any, task: str, where: str) -> InfiniteBenchSample:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for field in REQUIRED_FIELDS:
        if field not in record:
            raise UserError(
                f"{where}: missing field '{field}'; each record needs {', '.join(REQUIRED_FIELDS)}"
            )
    raw_answer = record["answer"]
    answer = [raw_answer] if isinstance(raw_answer, (str, int)) else list(raw_answer)
    if not answer:
        raise UserError(f"{where}: field 'answer' is empty")
    answer = [str(a) for a in answer]
    options = [str(o) for o in record.get("options") or []]
    if task == "longbook_choice_eng":
        if len(options) != len(OPTION_LETTERS):
            raise UserError(
                f"{where}: field 'options' must list 4 choices for {task}, got {len(options)}"
            )
        answer = list(_mc_answer(answer, options, where))
    return InfiniteBenchSample(
        task=task,
        id=str(record["id"]),
        context=str(record["context"]),
        input=str(record["input"]),
        answer=tuple(answer),
        options=tuple(options),
    )


def load_infinitebench(
    data_dir: str | Path, *, tasks: tuple[str, ...] = TASKS
) -> list[InfiniteBenchSample]:
    """Read each task from ``<data_dir>``: ``<task>.jsonl`` as the official release names it,
    or ``<task>.parquet`` / a ``<task>/`` dataset folder (``data.records.read_records``).

    Raises:
        FileNotFoundError: a task file is missing (the message names the expected file).
        ValueError: unknown task, bad JSON or a missing field (names file, line and field).
    """
    data_dir = Path(data_dir)
    samples: list[InfiniteBenchSample] = []
    for task in tasks:
        if task not in TASK_COLUMNS:
            raise UserError(
                f"unknown InfiniteBench task {task!r}; choose from {list(TASK_COLUMNS)}"
            )
        candidates = [data_dir / f"{task}{suffix}" for suffix in (".jsonl", ".parquet", "")]
        path = next((p for p in candidates if p.exists()), None)
        if path is None:
            raise FileNotFoundError(
                f"{candidates[0]} not found; download {task}.jsonl of xinrongzhang2022/InfiniteBench "
                f"into {data_dir}"
            )
        for where, record in read_records(path):
            samples.append(_parse_record(record, task, where))
    return samples


# ----------------------------------------------------------------------------- prompts
def build_prompt(
    sample: InfiniteBenchSample,
    *,
    templates: TemplateSet = "chat",
    max_prompt_tokens: int | None = None,
    codec: TextCodec | None = None,
) -> str:
    """Fill the official template; with a budget, middle-truncate the whole prompt (official rule)."""
    if templates not in _TEMPLATE_SETS:
        raise UserError(f"templates must be one of {sorted(_TEMPLATE_SETS)}, got {templates!r}")
    template = _TEMPLATE_SETS[templates][sample.task]
    fields: dict[str, str] = {
        "context": sample.context,
        "input": sample.input,
        "question": sample.input,
    }
    if sample.task == "longbook_choice_eng":
        fields.update(
            {f"OPTION_{letter}": opt for letter, opt in zip(OPTION_LETTERS, sample.options)}
        )
    prompt = template.format(**fields)
    if max_prompt_tokens is None:
        return prompt
    if codec is None:
        raise ValueError("max_prompt_tokens needs a codec= (e.g. tokens.as_codec(hf_tokenizer))")
    return truncate_middle(prompt, max_tokens=max_prompt_tokens, codec=codec)


# ----------------------------------------------------------------------------- scoring
def score_choice(prediction: str, label: tuple[str, ...]) -> float:
    """En.MC, official ``get_score_one_longbook_choice_eng``; ``label`` = (option text, letter).

    OpenBMB/InfiniteBench ``src/compute_scores.py:247-285`` (at 88b3daa), on the stripped
    prediction: 1. A leading A-D is the answer. 2. A prediction equal to the option text (or
    the letter) is right (``if pred in label``, list membership). 3. Otherwise, after replacing
    newline, quotes and
    ``.,?!{}`` with spaces, the text following the first of "answer is:", "answer:", "answer is",
    "option is" must start with the letter or the option text. 4. Otherwise the first word that is
    a piece of "ABCD" decides.
    """
    prediction = prediction.strip()
    if not prediction:
        return 0.0
    if prediction[0] in OPTION_LETTERS:
        return float(prediction[0] in label)
    if prediction in label:
        return 1.0
    for ch in ("\n", '"', "'", ".", ",", "?", "!", "{", "}"):
        prediction = prediction.replace(ch, " ")
    while "  " in prediction:
        prediction = prediction.replace("  ", " ")
    for prefix in ("answer is:", "answer:", "answer is", "option is"):
        idx = prediction.find(prefix)
        if idx == -1:
            continue
        after = prediction[idx + len(prefix) + 1 :]
        return float(bool(after) and any(after.startswith(s) for s in label))
    for word in prediction.split():
        if word in OPTION_LETTERS:  # substring test, as the official `word in "ABCD"`
            return float(word in label)
    return 0.0


def score_prediction(task: str, prediction: str, answer: tuple[str, ...]) -> float:
    """Score in [0, 1] of one prediction for one of the six tasks."""
    if task in ("passkey", "number_string"):
        return float(first_int(prediction) == answer[0])
    if task == "longbook_sum_eng":
        return max(rouge_lsum(prediction, ref) for ref in answer)
    if task == "longbook_qa_eng":
        return token_f1(prediction, answer)
    if task == "longbook_qa_chn":
        return zh_char_f1(prediction, answer)
    if task == "longbook_choice_eng":
        return score_choice(prediction, answer)
    raise UserError(f"unknown InfiniteBench task {task!r}; choose from {list(TASK_COLUMNS)}")


def score_sample(sample: InfiniteBenchSample, response: str) -> Record:
    """Per-sample record with the task and its score in [0, 1].

    Reasoning before the last ``</think>`` and surrounding whitespace are dropped first (the
    official scorer sees a chat API's answer content, already stripped of both).
    """
    prediction = strip_thinking(response).strip()
    return {"task": sample.task, "score": score_prediction(sample.task, prediction, sample.answer)}


def aggregate(records: list[Record]) -> dict[str, float]:
    """Mean score (%) per Table 3 column, and "Avg." over the tasks present."""
    scores: dict[str, float] = {}
    for task, column in TASK_COLUMNS.items():
        values = [r["score"] for r in records if r["task"] == task]
        if values:
            scores[column] = mean_percent(values)
    if scores:
        scores["Avg."] = sum(scores.values()) / len(scores)
    return scores


def make_suite(
    *,
    templates: TemplateSet = "chat",
    max_prompt_tokens: int | None = DEFAULT_MAX_PROMPT_TOKENS,
    tokenizer: Any = None,
    name: str | None = None,
    max_new_tokens: int | None = None,
) -> Suite[InfiniteBenchSample]:
    """A runner suite over samples of any of the six tasks (ids are prefixed by the task).

    The "chat" templates come with the official system turn (``CHAT_SYSTEM_MESSAGE``), the
    "base" ones (raw completion) without. Each sample is generated with its task's official
    budget (``MAX_NEW_TOKENS``), or with ``max_new_tokens`` for all when given.
    """
    codec = budget_codec(tokenizer, max_prompt_tokens)
    return Suite(
        name=name or f"infinitebench_{templates}",
        sample_id=lambda s: f"{s.task}/{s.id}",
        build_prompt=lambda s: build_prompt(
            s, templates=templates, max_prompt_tokens=max_prompt_tokens, codec=codec
        ),
        score_sample=score_sample,
        aggregate=aggregate,
        system_prompt=CHAT_SYSTEM_MESSAGE if templates == "chat" else None,
        max_new_tokens=(lambda s: MAX_NEW_TOKENS[s.task])
        if max_new_tokens is None
        else (lambda s: max_new_tokens),
    )
