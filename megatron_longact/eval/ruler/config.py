"""RULER's 13 synthetic tasks as typed configs, with its templates, answer prefixes and groups.

Values are those of RULER's ``scripts/synthetic.yaml`` and ``scripts/data/synthetic/constants.py``
(NVIDIA/RULER). The prompt of a task is ``template + answer_prefix`` (the "base" model template);
a generated sample keeps the two apart so a chat backend may put the prefix in the reply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_longact.errors import UserError

HaystackType = Literal["noise", "essay", "needle"]
NeedleType = Literal["numbers", "words", "uuids"]

NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to "
    "memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
NIAH_ANSWER_PREFIX = (
    " The special magic {type_needle_v} for {query} mentioned in the provided text are"
)
NIAH_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."

VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    "{context}\nQuestion: Find all variables that are assigned the value {query} in the text above."
)
VT_ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} "
    "variables are assigned the value {query}, they are: "
)

CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\n"
    "Question: What are the 10 most common words in the above list?"
)
CWE_ANSWER_PREFIX = " Answer: The top 10 words that appear most often in the list are:"

FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three "
    "most frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. "
    "Please ignore the dots '....'. What are the three most frequently appeared words in the "
    "above coded text?"
)
FWE_ANSWER_PREFIX = (
    " Answer: According to the coded text above, the three most frequently appeared words are:"
)

QA_TEMPLATE = (
    "Answer the question based on the given documents. Only give me the answer and do not output "
    "any other words.\n\nThe following are given documents.\n\n{context}\n\n"
    "Answer the question based on the given documents. Only give me the answer and do not output "
    "any other words.\n\nQuestion: {query}"
)
QA_ANSWER_PREFIX = " Answer:"
QA_DOCUMENT = "Document {i}:\n{document}"

# Tokens reserved for the answer, per family (constants.py "tokens_to_generate").
TOKENS_TO_GENERATE = {"niah": 128, "variable_tracking": 30, "cwe": 120, "fwe": 50, "qa": 32}
# Below this context length CWE uses its short-context word frequencies (RULER's 4096 switch).
CWE_SHORT_CONTEXT = 4096
DEFAULT_SEED = 42  # RULER's default --random_seed


@dataclass(frozen=True)
class NiahConfig:
    """Needle-in-a-haystack: ``num_needle_k`` keys, ``num_needle_v`` values each, ``num_needle_q`` asked."""

    type_haystack: HaystackType = "essay"
    type_needle_k: NeedleType = "words"
    type_needle_v: NeedleType = "numbers"
    num_needle_k: int = 1
    num_needle_v: int = 1
    num_needle_q: int = 1
    family: str = "niah"


@dataclass(frozen=True)
class VariableTrackingConfig:
    """``num_chains`` chains of ``num_hops`` assignments ``VAR X = VAR Y`` from one value."""

    type_haystack: HaystackType = "noise"
    num_chains: int = 1
    num_hops: int = 4
    add_fewshot: bool = True
    family: str = "variable_tracking"


@dataclass(frozen=True)
class CommonWordsConfig:
    """``num_cw`` words repeated ``freq_cw`` times among others repeated ``freq_ucw`` times."""

    freq_cw: int = 30
    freq_ucw: int = 3
    num_cw: int = 10
    num_fewshot: int = 1
    family: str = "cwe"


@dataclass(frozen=True)
class FreqWordsConfig:
    """Coded words drawn with Zipf(``alpha``) frequencies; the top three (after '...') are asked."""

    alpha: float = 2.0
    coded_wordlen: int = 6
    vocab_size: int = -1  # -1: RULER's max_seq_length // 50
    family: str = "fwe"


@dataclass(frozen=True)
class QAConfig:
    """Question answering over a pool of documents the caller supplies (see ruler.qa)."""

    dataset: str = "squad"
    family: str = "qa"


TaskConfig = NiahConfig | VariableTrackingConfig | CommonWordsConfig | FreqWordsConfig | QAConfig

RULER_TASKS: dict[str, TaskConfig] = {
    "niah_single_1": NiahConfig(type_haystack="noise"),
    "niah_single_2": NiahConfig(type_haystack="essay"),
    "niah_single_3": NiahConfig(type_haystack="essay", type_needle_v="uuids"),
    "niah_multikey_1": NiahConfig(type_haystack="essay", num_needle_k=4),
    "niah_multikey_2": NiahConfig(type_haystack="needle"),
    "niah_multikey_3": NiahConfig(
        type_haystack="needle", type_needle_k="uuids", type_needle_v="uuids"
    ),
    "niah_multivalue": NiahConfig(type_haystack="essay", num_needle_v=4),
    "niah_multiquery": NiahConfig(type_haystack="essay", num_needle_q=4),
    "vt": VariableTrackingConfig(),
    "cwe": CommonWordsConfig(),
    "fwe": FreqWordsConfig(),
    "qa_1": QAConfig(dataset="squad"),
    "qa_2": QAConfig(dataset="hotpotqa"),
}

NIAH_TASKS = tuple(name for name in RULER_TASKS if name.startswith("niah_"))
# The paper's Table 2: "NIAH-sub is derived from the multi-key level 2, multi-key level 3 and
# multi-value tasks"; we read "NIAH" as all eight NIAH tasks (sub included) and QA as qa_1+qa_2.
TABLE2_GROUPS: dict[str, tuple[str, ...]] = {
    "NIAH-sub": ("niah_multikey_2", "niah_multikey_3", "niah_multivalue"),
    "NIAH": NIAH_TASKS,
    "VT": ("vt",),
    "QA": ("qa_1", "qa_2"),
}
TABLE2_COLUMNS = (*TABLE2_GROUPS, "Avg")


def task_config(task: str) -> TaskConfig:
    """The config of a RULER task name; ValueError naming the valid ones otherwise."""
    if task not in RULER_TASKS:
        raise UserError(f"unknown RULER task {task!r}; choose from {list(RULER_TASKS)}")
    return RULER_TASKS[task]
