"""RULER (Hsieh et al. 2024): generate its synthetic tasks at any length, score, group for Table 2.

The package: ``config`` (task settings and templates), ``layout`` (samples, budget fitting),
``text`` (filler and values), ``niah`` / ``words`` / ``qa`` (the task families), ``files``
(RULER's own generated files and essay haystack); this module generates, scores and makes the
runner suite.

Usage::

    samples = generate_ruler(max_seq_length=131072, num_samples=100, tokenizer=hf_tok,
                             qa_pools={"qa_1": load_squad_pool(p1), "qa_2": load_hotpotqa_pool(p2)})
    scores = runner.evaluate(make_suite(name="ruler_128k"), samples, generate_fn, out_dir=...)

Every sample is deterministic in (seed, task, max_seq_length, index) and its prompt plus the
task's answer tokens fits ``max_seq_length`` under the given tokenizer. Scoring is RULER's:
``string_match_all`` for NIAH/VT/CWE/FWE, ``string_match_part`` for QA, after its prediction
clean-up; task scores are percent means. Table 2's columns average tasks (TABLE2_GROUPS), and
its "Avg" averages those columns.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from megatron_longact.errors import UserError
from megatron_longact.eval.metrics import (
    ruler_postprocess,
    string_match_all,
    string_match_part,
    strip_thinking,
)
from megatron_longact.eval.ruler.config import (
    DEFAULT_SEED,
    RULER_TASKS,
    TABLE2_GROUPS,
    TOKENS_TO_GENERATE,
    CommonWordsConfig,
    FreqWordsConfig,
    NiahConfig,
    QAConfig,
    TaskConfig,
    VariableTrackingConfig,
    task_config,
)
from megatron_longact.eval.ruler.layout import Filled, RulerSample
from megatron_longact.eval.ruler.niah import generate_niah, generate_variable_tracking
from megatron_longact.eval.ruler.qa import QAPool, generate_qa
from megatron_longact.eval.ruler.words import generate_cwe, generate_fwe
from megatron_longact.eval.suite import Record, Suite, mean_percent
from megatron_longact.eval.tokens import TextCodec, as_codec


def generate_ruler_task(
    task: str,
    *,
    num_samples: int,
    max_seq_length: int,
    tokenizer: Any,
    seed: int = DEFAULT_SEED,
    depths: Sequence[float] | None = None,
    essay_text: str | None = None,
    qa_pool: QAPool | None = None,
) -> list[RulerSample]:
    """``num_samples`` samples of one RULER task, each fitting ``max_seq_length`` tokens.

    Args:
        task: a key of ``RULER_TASKS`` (e.g. "niah_single_2", "vt", "qa_1").
        max_seq_length: token budget of prompt plus the task's reserved answer tokens.
        tokenizer: HF tokenizer or :class:`tokens.TextCodec`; lengths are measured with it.
        seed: base seed; sample i of a task uses its own stream derived from (seed, task, length, i).
        depths: NIAH only -- fraction of the context's tokens before each needle, one per needle
            (e.g. ``[0.5]``); None draws them as RULER does.
        essay_text: NIAH essay haystack text; None uses the generated essay-like filler.
        qa_pool: the documents and questions of a QA task (required for qa_1/qa_2).
    """
    cfg = task_config(task)
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    if depths is not None and not isinstance(cfg, NiahConfig):
        raise ValueError(f"depths= applies to NIAH tasks only, not {task!r}")
    if isinstance(cfg, QAConfig) and qa_pool is None:
        raise UserError(
            f"RULER task {task} needs a qa_pool: ruler.qa.load_squad_pool(path) / load_hotpotqa_pool(path) "
            "for the official sets, or ruler.qa.synthetic_qa_pool() offline"
        )
    codec = as_codec(tokenizer)
    tokens_to_generate = TOKENS_TO_GENERATE[cfg.family]
    budget = max_seq_length - tokens_to_generate
    samples = []
    for index in range(num_samples):
        sample_seed = f"{seed}:{task}:{max_seq_length}:{index}"
        filled, outputs = _generate_one(
            cfg, task=task, index=index, seed=sample_seed, codec=codec, budget=budget,
            max_seq_length=max_seq_length, depths=depths, essay_text=essay_text, qa_pool=qa_pool,
        )  # fmt: skip
        num_tokens = codec.count(filled.prompt) + tokens_to_generate
        assert num_tokens <= max_seq_length, (
            f"{task} sample {index}: {num_tokens} > {max_seq_length}"
        )
        samples.append(
            RulerSample(
                task=task,
                index=index,
                input=filled.input,
                answer_prefix=filled.answer_prefix,
                outputs=tuple(outputs),
                num_tokens=num_tokens,
                max_seq_length=max_seq_length,
                context_span=filled.context_span,
                needles=filled.needles,
                depths=filled.depths,
            )
        )
    return samples


def _generate_one(
    cfg: TaskConfig,
    *,
    task: str,
    index: int,
    seed: str,
    codec: TextCodec,
    budget: int,
    max_seq_length: int,
    depths: Sequence[float] | None,
    essay_text: str | None,
    qa_pool: QAPool | None,
) -> tuple[Filled, list[str]]:
    if isinstance(cfg, NiahConfig):
        return generate_niah(
            cfg,
            task=task,
            seed=seed,
            codec=codec,
            budget=budget,
            depths=depths,
            essay_text=essay_text,
        )
    if isinstance(cfg, VariableTrackingConfig):
        return generate_variable_tracking(cfg, task=task, seed=seed, codec=codec, budget=budget)
    if isinstance(cfg, CommonWordsConfig):
        return generate_cwe(
            cfg, task=task, seed=seed, codec=codec, budget=budget, max_seq_length=max_seq_length
        )
    if isinstance(cfg, FreqWordsConfig):
        return generate_fwe(cfg, task=task, seed=seed, codec=codec, budget=budget)
    if isinstance(cfg, QAConfig):
        assert qa_pool is not None
        return generate_qa(qa_pool, index=index, task=task, seed=seed, codec=codec, budget=budget)
    raise AssertionError(f"unhandled config {cfg!r}")


def generate_ruler(
    *,
    max_seq_length: int,
    num_samples: int,
    tokenizer: Any,
    tasks: Iterable[str] = tuple(RULER_TASKS),
    seed: int = DEFAULT_SEED,
    qa_pools: Mapping[str, QAPool] | None = None,
    essay_text: str | None = None,
) -> list[RulerSample]:
    """Samples of several tasks at one length; ``qa_pools`` maps QA task names to pools."""
    codec = as_codec(tokenizer)
    samples: list[RulerSample] = []
    for task in tasks:
        pool = (qa_pools or {}).get(task)
        samples += generate_ruler_task(
            task, num_samples=num_samples, max_seq_length=max_seq_length, tokenizer=codec,
            seed=seed, essay_text=essay_text, qa_pool=pool,
        )  # fmt: skip
    return samples


# ----------------------------------------------------------------------------- scoring
def score_prediction(task: str, prediction: str, references: Sequence[str]) -> float:
    """RULER's per-sample score in [0, 1]: match-part for QA, match-all otherwise."""
    pred = ruler_postprocess(strip_thinking(prediction))
    if task_config(task).family == "qa":
        return string_match_part(pred, references)
    return string_match_all(pred, references)


def score_sample(sample: RulerSample, response: str) -> Record:
    """Per-sample record: task, length and score in [0, 1]."""
    return {
        "task": sample.task,
        "max_seq_length": sample.max_seq_length,
        "score": score_prediction(sample.task, response, sample.outputs),
    }


def aggregate(records: list[Record]) -> dict[str, float]:
    """Percent score per task present, Table 2's group columns, and their "Avg".

    A group averages its tasks that are present; "Avg" averages the groups present (the paper's
    Avg is the mean of NIAH-sub, NIAH, VT and QA).
    """
    by_task: dict[str, list[float]] = {}
    for record in records:
        by_task.setdefault(record["task"], []).append(record["score"])
    scores = {task: mean_percent(values) for task, values in by_task.items()}
    groups = {}
    for group, members in TABLE2_GROUPS.items():
        present = [scores[t] for t in members if t in scores]
        if present:
            groups[group] = sum(present) / len(present)
    scores.update(groups)
    if groups:
        scores["Avg"] = sum(groups.values()) / len(groups)
    return scores


def make_suite(
    *, name: str = "ruler", include_answer_prefix: bool = True, chat_template: bool = True
) -> Suite[RulerSample]:
    """A runner suite; prompts end with the answer prefix unless a chat backend adds it itself.

    ``chat_template=False`` sends ``input + answer_prefix`` as is, for RULER's own files whose
    ``input`` already holds the model template (``ruler.files``).
    """
    return Suite(
        name=name,
        sample_id=lambda s: f"{s.task}/{s.max_seq_length}/{s.index}",
        build_prompt=(lambda s: s.prompt) if include_answer_prefix else (lambda s: s.input),
        score_sample=score_sample,
        aggregate=aggregate,
        chat_template=chat_template,
    )
