"""RL prompts: records -> chat-formatted token ids that fit the prompt budget.

One user-message template per answer type (docs/data.md lists them per source):

- ``number`` (the gold answer is a number: synthetic KV, DocMath): the synthetic task's prompt
  (``data.synthetic.format_prompt``), word for word what the SFT cold start trained on;
- ``letter`` (multiple choice: DocQA's long_toc_choices, our ``choices``): the options listed
  as "(A) text" lines, the letter asked for inside ``<answer>``;
- ``short`` (anything else: MemAgent/HotpotQA, MuSiQue, MultiHopRAG, yes/no): a short answer
  inside ``<answer>``.

The user turn is rendered by the chat template the SFT samples use (``data.chat_template``),
and the long context is truncated in the middle so that prompt + ``max_new_tokens`` fits
``max_seq_length``.
"""

from __future__ import annotations

from typing import Literal

from megatron_longact.data.answers import infer_answer_type
from megatron_longact.data.chat_template import render_user_prompt
from megatron_longact.data.rl_data import RLRecord, truncate_middle_text
from megatron_longact.data.synthetic import format_prompt
from megatron_longact.errors import UserError

AnswerKind = Literal["letter", "number", "short"]

_DOCUMENT = "Read the document and answer the question.\n\nDocument:\n{context}\n\n"
MC_TEMPLATE = (
    _DOCUMENT + "Question: {question}\nChoices:\n{choices}\n"
    "Think inside <think></think>, then give the letter of the correct choice inside "
    "<answer></answer>."
)
# Multiple choice whose options could not be split off: they are in the question text.
MC_INLINE_TEMPLATE = (
    _DOCUMENT + "Question: {question}\n"
    "Think inside <think></think>, then give the letter of the correct choice inside "
    "<answer></answer>."
)
SHORT_ANSWER_TEMPLATE = (
    _DOCUMENT + "Question: {question}\n"
    "Think inside <think></think>, then give a short answer (a few words, a name, or yes/no) "
    "inside <answer></answer>."
)


def answer_kind(record: RLRecord) -> AnswerKind:
    """``letter`` with choices or a gold letter, ``number`` for a numeric gold, else ``short``
    (the reward's ``infer_answer_type``, so the prompt asks for what the reward compares)."""
    if record.choices:
        return "letter"
    kind = infer_answer_type(record.answer)
    return {"mc": "letter", "number": "number"}.get(kind, "short")


def user_message(record: RLRecord, context: str) -> str:
    """The user turn for ``record`` with ``context`` (possibly truncated)."""
    kind = answer_kind(record)
    if kind == "letter" and record.choices:
        listing = "\n".join(f"({k}) {v}" for k, v in sorted(record.choices.items()))
        return MC_TEMPLATE.format(context=context, question=record.question, choices=listing)
    if kind == "letter":
        return MC_INLINE_TEMPLATE.format(context=context, question=record.question)
    if kind == "number":
        return format_prompt(context, record.question)
    return SHORT_ANSWER_TEMPLATE.format(context=context, question=record.question)


def gold_answer(record: RLRecord):
    """The gold answer as the reward functions take it (a letter for multiple choice)."""
    return record.answer


def encode_prompt(record: RLRecord, tokenizer, *, max_prompt_tokens: int) -> list[int]:
    """Token ids of the chat prompt (generation prompt appended), at most ``max_prompt_tokens``.

    Raises ValueError naming the record when even an empty context does not fit.
    """

    def encode(context: str) -> list[int]:
        text = render_user_prompt(tokenizer, user_message(record, context))
        return tokenizer.encode(text, add_special_tokens=False)

    ids = encode(record.context)
    if len(ids) <= max_prompt_tokens:
        return ids
    overhead = len(encode(""))
    if overhead >= max_prompt_tokens:
        raise UserError(
            f"record {record.id}: the prompt without context takes {overhead} tokens, more than "
            f"the budget {max_prompt_tokens} (rl.max_seq_length - rl.max_new_tokens)"
        )
    budget = max_prompt_tokens - overhead
    # Re-tokenising the joined halves can gain a token; shrink until it fits.
    while True:
        ids = encode(truncate_middle_text(record.context, tokenizer, budget))
        if len(ids) <= max_prompt_tokens:
            return ids
        budget -= len(ids) - max_prompt_tokens
