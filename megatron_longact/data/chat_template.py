"""Chat templates: the one rule by which SFT samples, RL prompts and eval prompts become text.

Which template renders a conversation: the tokenizer's own ``chat_template`` when it has one
(Qwen3's and SmolLM2's ``<|im_start|>`` ChatML variants, the tiny tokenizer's plain ChatML),
else plain ChatML (:data:`~megatron_longact.data.tokenizer.CHATML_TEMPLATE`) when the tokenizer
has single ``<|im_start|>``/``<|im_end|>`` tokens. Rendering goes through transformers'
``apply_chat_template(tokenize=False)``, so a template's own rules hold in all three stages:
SmolLM2 inserts its default system prompt, and Qwen3 rewrites an assistant turn's
``<think>...</think>`` as ``<think>\\n...\\n</think>\\n\\n`` (and drops it from turns before the
last user message), in SFT targets exactly as in what the model is prompted to produce in RL.

What an assistant turn trains on (:func:`assistant_spans`): everything the model would generate
after the template's generation prompt, up to and including the first special token that closes
the turn (``<|im_end|>``), where generation stops. So a generation prompt that opens a think
block (``<|im_start|>assistant\\n<think>\\n``) leaves ``<think>\\n`` in the prompt, not the
target, and RL scores the response with that prefix (:func:`generation_think_prefix`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from megatron_longact.data.tokenizer import CHATML_TEMPLATE, IM_END, IM_START
from megatron_longact.errors import UserError

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
# A user turn used to read a template's generation prompt; its text never reaches a sample.
_PROBE_MESSAGES = ({"role": "user", "content": "probe"},)


def resolve_chat_template(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The template string to render with, or None when the tokenizer has neither its own
    template nor ChatML special tokens (then only raw-text prompts are possible)."""
    own = getattr(tokenizer, "chat_template", None)
    if own:
        return own
    if all(_is_single_token(tokenizer, t) for t in (IM_START, IM_END)):
        return CHATML_TEMPLATE
    return None


def _is_single_token(tokenizer: PreTrainedTokenizerBase, token: str) -> bool:
    return len(tokenizer.encode(token, add_special_tokens=False)) == 1


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict[str, Any]],
    *,
    add_generation_prompt: bool,
) -> str:
    """``messages`` as text under the resolved template (see the module docstring).

    Raises:
        ValueError: the tokenizer has no chat template and no ChatML tokens, or the template
            fails on these messages (the message says which and how to fix it).
    """
    template = resolve_chat_template(tokenizer)
    if template is None:
        raise UserError(
            f"tokenizer {tokenizer.name_or_path!r} has no chat template and no {IM_START}/"
            f"{IM_END} tokens, so conversations cannot be rendered; use a tokenizer folder whose "
            "tokenizer_config.json (or chat_template.jinja) has a chat_template."
        )
    try:
        return tokenizer.apply_chat_template(
            list(messages),
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )
    except Exception as err:  # jinja2 errors: raised by the template itself, any type
        raise UserError(
            f"the chat template of {tokenizer.name_or_path!r} failed on a conversation of "
            f"roles {[m.get('role') for m in messages]}: {err}"
        ) from err


def render_user_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> str:
    """``text`` as one user turn followed by the generation prompt (RL and eval prompts)."""
    return render_chat(tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True)


def special_token_strings(tokenizer: PreTrainedTokenizerBase) -> tuple[str, ...]:
    """The added tokens marked special (``<|im_end|>``, ``<|endoftext|>``, ...), longest first.

    Qwen3's ``<think>``/``</think>`` and the tiny tokenizer's tags are added but not special, so
    they are never taken for the end of a turn.
    """
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    found = {str(t) for t in decoder.values() if getattr(t, "special", False)}
    found.update(t for t in tokenizer.all_special_tokens if t)
    return tuple(sorted(found, key=len, reverse=True))


def _turn_end(text: str, start: int, specials: Sequence[str]) -> int:
    """End (exclusive) of the first special token in ``text[start:]``, or -1 when none."""
    found = [(at, -len(t)) for t in specials if (at := text.find(t, start)) != -1]
    if not found:
        return -1
    at, minus_length = min(found)  # the earliest; at a tie the longest token
    return at - minus_length


def assistant_spans(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, Any]]
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans ``[start, end)`` each assistant turn
    trains on.

    A turn's span starts where the template's generation prompt for the conversation so far ends
    (``render(messages[:i], add_generation_prompt=True)``, which must be a prefix of the whole
    rendering) and ends after the first special token that follows (the end-of-turn token).

    Raises:
        ValueError: the template renders earlier turns differently once later ones follow (its
            generation prompt is not a prefix of the conversation), or closes an assistant turn
            without a special token.
    """
    text = render_chat(tokenizer, messages, add_generation_prompt=False)
    specials = special_token_strings(tokenizer)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render_chat(tokenizer, messages[:index], add_generation_prompt=True)
        if not text.startswith(prompt) or len(prompt) < cursor:
            raise UserError(
                f"messages[{index}]: the chat template's generation prompt for the conversation "
                f"so far ({prompt[-60:]!r}) is not how the template renders that point of the "
                "whole conversation, so the assistant target is undefined; use a template that "
                "renders each turn the same whatever follows (or split the conversation)."
            )
        end = _turn_end(text, len(prompt), specials)
        if end == -1:
            raise UserError(
                f"messages[{index}]: the chat template closes the assistant turn with no special "
                "token, so generation would never stop there; use a template that ends turns "
                f"with an end-of-turn token such as {IM_END}."
            )
        spans.append((len(prompt), end))
        cursor = end
    return text, spans


def generation_think_prefix(tokenizer: PreTrainedTokenizerBase) -> str:
    """The open think block the generation prompt ends with (``"<think>\\n"`` for templates that
    start the reasoning themselves), else ``""``. The model's response continues it, so a reward
    that checks the think/answer format must read ``prefix + response``.
    """
    with_prompt = render_chat(tokenizer, _PROBE_MESSAGES, add_generation_prompt=True)
    without = render_chat(tokenizer, _PROBE_MESSAGES, add_generation_prompt=False)
    generation_prompt = with_prompt[len(without) :] if with_prompt.startswith(without) else ""
    opened = generation_prompt.rfind(THINK_OPEN)
    if opened == -1 or THINK_CLOSE in generation_prompt[opened:]:
        return ""
    return generation_prompt[opened:]
