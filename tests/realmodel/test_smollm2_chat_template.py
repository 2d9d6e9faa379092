"""SmolLM2-135M-Instruct's own tokenizer and chat template: the SFT loss mask token by token.

Its BPE merges across tag edges (``</think><answer>`` is ``</``, ``think``, ``><``, ...) and its
template inserts a default system prompt; the mask must still cover exactly the assistant turns,
and the SFT prompt must be, id for id, what RL and eval prompt the model with.
"""

from __future__ import annotations

from megatron_longact.data.chat import tokenize_conversation
from megatron_longact.data.prompts import encode_prompt, user_message
from megatron_longact.data.rl_data import RLRecord
from megatron_longact.eval.backends import chat_prompt

SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n"
)
REPLY = "<think>The document says 512.</think><answer>512</answer>"
REPLY_2 = "<think>It says 907.</think><answer>907</answer>"


def _runs(sample, value: int) -> list[list[int]]:
    runs: list[list[int]] = []
    previous = None
    for token, m in zip(sample.input_ids, sample.loss_mask):
        if m == value:
            if previous != value:
                runs.append([])
            runs[-1].append(token)
        previous = m
    return runs


def test_mask_is_exactly_the_assistant_turns(smollm2_tokenizer):
    tok = smollm2_tokenizer
    messages = [
        {"role": "user", "content": "What is the code of the red fox?"},
        {"role": "assistant", "content": REPLY},
        {"role": "user", "content": "And the blue owl?"},
        {"role": "assistant", "content": REPLY_2},
    ]
    sample = tokenize_conversation(messages, tok, max_length=1024)
    # Every token is the template's own: the ids are transformers' tokenization of the text.
    assert sample.input_ids == list(
        tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    )
    trained = [tok.decode(run) for run in _runs(sample, 1)]
    assert trained == [REPLY + "<|im_end|>", REPLY_2 + "<|im_end|>"]
    untrained = [tok.decode(run) for run in _runs(sample, 0)]
    assert untrained == [
        SYSTEM + "<|im_start|>user\nWhat is the code of the red fox?<|im_end|>\n"
        "<|im_start|>assistant\n",
        "\n<|im_start|>user\nAnd the blue owl?<|im_end|>\n<|im_start|>assistant\n",
        "\n",
    ]
    # Token by token: the trained ids are the reply's own tokenization, then <|im_end|>.
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    first = tok.encode(REPLY, add_special_tokens=False) + [im_end]
    start = sample.loss_mask.index(1)
    assert sample.input_ids[start : start + len(first)] == first
    assert sample.loss_mask[start : start + len(first)] == [1] * len(first)
    assert sample.loss_mask[start + len(first)] == 0


def test_sft_prompt_is_the_rl_and_eval_prompt(smollm2_tokenizer):
    tok = smollm2_tokenizer
    record = RLRecord(id="r0", context="The code of the red fox is 512.",
                      question="What is the code of the red fox?", answer="512", choices=None,
                      source="synthetic_kv")  # fmt: skip
    text = user_message(record, record.context)
    sample = tokenize_conversation(
        [{"role": "user", "content": text}, {"role": "assistant", "content": REPLY}],
        tok,
        max_length=1024,
    )
    prompt = sample.input_ids[: sample.loss_mask.index(1)]
    assert prompt == encode_prompt(record, tok, max_prompt_tokens=1024)
    assert prompt == tok.encode(chat_prompt(tok, text), add_special_tokens=False)
    assert tok.decode(prompt).startswith(SYSTEM)
