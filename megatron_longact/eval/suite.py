"""The one interface between a benchmark and the runner: a bundle of plain functions.

Each benchmark module has a ``make_suite(...)`` that returns a :class:`Suite`; the runner knows
nothing else about benchmarks, and no benchmark knows how text is generated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

S = TypeVar("S")

Record = dict[str, Any]


@dataclass(frozen=True)
class Suite(Generic[S]):
    """How to prompt, score and aggregate one benchmark.

    Attributes:
        name: file-name-safe label; the runner writes ``<name>.predictions.jsonl``.
        sample_id: unique, stable id of a sample (resume key).
        build_prompt: the full prompt text for a sample.
        score_sample: (sample, final response) -> JSON-serializable record holding every field
            ``aggregate`` needs (so scores can be recomputed from the predictions file alone).
        aggregate: records -> scores in percent, keyed by the paper's column names.
        followup_prompt: optional second turn, (sample, first response) -> prompt; used by
            LongBench v2's official CoT mode, which asks for the answer in a second query.
        system_prompt: system turn put before every prompt when the model has a chat template
            (InfiniteBench's official chat message); None: no system turn.
        chat_template: False sends the prompt to the model as is, because it already holds
            the model's template (RULER's own generated files); True wraps it as a user turn.
        max_new_tokens: the generation budget of a sample (InfiniteBench's official per-task
            budgets); None: the backend's default for every sample.
    """

    name: str
    sample_id: Callable[[S], str]
    build_prompt: Callable[[S], str]
    score_sample: Callable[[S, str], Record]
    aggregate: Callable[[list[Record]], dict[str, float]]
    followup_prompt: Callable[[S, str], str] | None = None
    system_prompt: str | None = None
    chat_template: bool = True
    max_new_tokens: Callable[[S], int] | None = None


def mean_percent(values: list[float]) -> float:
    """Mean of per-sample scores in [0, 1], in percent; NaN for an empty split."""
    return 100.0 * sum(values) / len(values) if values else float("nan")
