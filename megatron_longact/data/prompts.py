"""RL prompts: records -> chat-formatted token ids that fit the prompt budget.

The user message matches what the SFT cold start trained on (``data.synthetic.format_prompt``
for free-form answers, a LongBench-v2-style listing for multiple choice), and the long context
is truncated in the middle so that prompt + ``max_new_tokens`` fits ``max_seq_length``.
"""

from __future__ import annotations

from megatron_longact.data.rl_data import RLRecord, truncate_middle_text
from megatron_longact.data.synthetic import format_prompt

MC_TEMPLATE = (
    "Read the document and answer the question.\n\nDocument:\n{context}\n\n"
    "Question: {question}\nChoices:\n{choices}\n"
    "Think inside <think></think>, then give the letter of the correct choice inside "
    "<answer></answer>."
)


def user_message(record: RLRecord, context: str) -> str:
    """The user turn for ``record`` with ``context`` (possibly truncated)."""
    if record.choices:
        listing = "\n".join(f"({k}) {v}" for k, v in sorted(record.choices.items()))
        return MC_TEMPLATE.format(context=context, question=record.question, choices=listing)
    return format_prompt(context, record.question)


def gold_answer(record: RLRecord):
    """The gold answer as the reward functions take it (a letter for multiple choice)."""
    return record.answer


def encode_prompt(record: RLRecord, tokenizer, *, max_prompt_tokens: int) -> list[int]:
    """Token ids of the chat prompt (generation prompt appended), at most ``max_prompt_tokens``.

    Raises ValueError naming the record when even an empty context does not fit.
    """

    def encode(context: str) -> list[int]:
        messages = [{"role": "user", "content": user_message(record, context)}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer.encode(text, add_special_tokens=False)

    ids = encode(record.context)
    if len(ids) <= max_prompt_tokens:
        return ids
    overhead = len(encode(""))
    if overhead >= max_prompt_tokens:
        raise ValueError(
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
