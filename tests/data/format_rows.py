"""Rows in each source's published layout, shared by the format tests and the fixture builder.

Layouts (docs/data.md): AM-DeepSeek-R1-0528-Distilled (ShareGPT ``system`` + ``conversations``
of ``from``/``value``; the ``info`` keys here are illustrative, the loader ignores them), our
``messages`` SFT rows, DocQA-RL-1.6K and MemAgent in verl's RL layout (``data_source``,
``prompt``, ``reward_model.ground_truth``, ``extra_info``), our RL rows, LongBench v2
(``data.json`` fields) and InfiniteBench (``id, context, input, answer, options``). Each source
keeps one type per column, as a parquet/Arrow column must (and the published files do).
"""

from __future__ import annotations

DOCQA_HEAD = "Please read the following text and answer the question below.\n\n<text>\n"


def _docqa_prompt(doc: str, question: str, answer_format: str) -> str:
    return (
        f"{DOCQA_HEAD}{doc}\n</text>\n\n{question}\n\n"
        f'Format your response as follows: "{answer_format} (insert answer here)".'
    )


AM_SFT = [
    {
        "system": "",
        "conversations": [
            {"from": "human", "value": "What is the code of the red fox?",
             "info": {"source": "kv", "reference_answer": "512", "think_content": None}},
            {"from": "assistant", "value": "<think>\nThe text says 512.\n</think>\n<answer>\n512"
             "\n</answer>", "info": {"source": "kv", "reference_answer": None,
                                      "think_content": "The text says 512."}},
        ],
    },
    {
        "system": "You are a careful reader.",
        "conversations": [
            {"from": "human", "value": "Name the river.",
             "info": {"source": "qa", "reference_answer": "Loire", "think_content": None}},
            {"from": "assistant", "value": "<think>\nIt is the Loire.\n</think>\n<answer>\nLoire"
             "\n</answer>", "info": {"source": "qa", "reference_answer": None,
                                      "think_content": "It is the Loire."}},
        ],
    },
]  # fmt: skip

MESSAGES_SFT = [
    {"messages": [{"role": "user", "content": "Hi?"},
                  {"role": "assistant", "content": "<think>Greeting.</think><answer>Hi</answer>"}]},
]  # fmt: skip

DOCQA_RL = [
    {
        "data_source": "long_toc_choices_0_20000",
        "prompt": [{"role": "user", "content": _docqa_prompt(
            "Chapter 1: Rivers. Chapter 2: Lakes.",
            "What is the correct answer to this question: Which chapter covers lakes?\nChoices:\n"
            "(A) Chapter 1\n(B) Chapter 2\n(C) Both\n(D) Neither",
            "The correct answer is")}],
        "ability": "doc-mc",
        "reward_model": {"style": "rule", "ground_truth": "The correct answer is (B)"},
        "extra_info": {"index": 11},
    },
    {
        "data_source": "docmath_qa",
        "prompt": [{"role": "user", "content": _docqa_prompt(
            "Revenue was 1,200 in 2020 and 1,500 in 2021.", "By how much did revenue grow?",
            "Therefore, the answer is")}],
        "ability": "doc-math",
        "reward_model": {"style": "rule", "ground_truth": "Therefore, the answer is 300."},
        "extra_info": {"index": 12},
    },
    {
        "data_source": "multihoprag_qa",
        "prompt": [{"role": "user", "content": _docqa_prompt(
            "Doc A: The tower opened in 1889. Doc B: It is in Paris.",
            "Did the tower open before 1900?", "Therefore, the answer is")}],
        "ability": "doc-qa",
        "reward_model": {"style": "rule", "ground_truth": "yes"},
        "extra_info": {"index": 13},
    },
]  # fmt: skip

MEMAGENT_RL = [
    {
        "data_source": "hotpotqa",
        "prompt": [{"role": "user", "content": "Who wrote the novel?"}],
        "context": "Document 1:\nThe novel was written by Ann Lee.\n\nDocument 2:\nA bridge.",
        "ability": "memory",
        "reward_model": {"style": "rule", "ground_truth": ["Ann Lee", "Lee"]},
        "extra_info": {"index": 4, "question": "Who wrote the novel?", "num_docs": 2},
    },
]  # fmt: skip

OUR_RL = [
    {"id": "kv-0", "context": "The code of the red fox is 512.", "question": "Code?",
     "answer": "512", "choices": None, "source": "synthetic_kv"},
    {"id": "mc-0", "context": "Lakes are in chapter 2.", "question": "Which chapter?",
     "answer": "B", "choices": {"A": "one", "B": "two"}, "source": "toy"},
    # Arrow stores a dict column as one struct: this row's missing "C" comes back as null.
    {"id": "mc-1", "context": "Three doors.", "question": "Which door?", "answer": "C",
     "choices": {"A": "red", "B": "blue", "C": "green"}, "source": "toy"},
]  # fmt: skip

LONGBENCH_V2 = [
    {"_id": "66f36490821e116aacb2cc22", "domain": "Single-Document QA", "sub_domain": "Financial",
     "difficulty": "easy", "length": "short", "question": "How many items?", "choice_A": "one",
     "choice_B": "two", "choice_C": "three", "choice_D": "four", "answer": "A",
     "context": "The report lists one item."},
]  # fmt: skip

INFINITEBENCH_CHOICE = [
    {"id": 0, "context": "Eve met Fay.", "input": "Who met Fay?", "answer": ["Eve"],
     "options": ["Eve", "Gus", "Hal", "Ivy"]},
]  # fmt: skip

SOURCES: dict[str, list[dict]] = {
    "am_sft": AM_SFT,
    "messages_sft": MESSAGES_SFT,
    "docqa_rl": DOCQA_RL,
    "memagent_rl": MEMAGENT_RL,
    "our_rl": OUR_RL,
    "longbench_v2": LONGBENCH_V2,
    "longbook_choice_eng": INFINITEBENCH_CHOICE,
}
