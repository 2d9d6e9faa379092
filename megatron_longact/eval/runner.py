"""Backend-agnostic evaluation loop: prompts in batches, predictions to disk, scores out.

``generate_fn`` is whatever turns prompts into completions (vLLM, a megatron inference engine,
a test stub); this module imports none of them. Each finished batch is appended to
``<out_dir>/<suite>.predictions.jsonl`` with one ``write`` followed by flush and fsync, so a
crash loses at most the batch in flight; a rerun skips the ids already on disk (a torn last
line from a crash is dropped) and scores everything at the end from the file, as LongBench's
``pred.py`` caches and ``result.py`` scores.

:func:`evaluate_sampled` is the sampled counterpart: k responses per prompt at a temperature,
scored into mean@k with its standard error over prompts and the unbiased pass@k.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from megatron_longact.errors import UserError
from megatron_longact.eval.suite import Record, Suite
from megatron_longact.stats import call_seed, mean_and_se, pass_at_k, pass_ks

S = TypeVar("S")
GenerateFn = Callable[..., list[str]]
"""``(prompts) -> completions``, also called with ``max_new_tokens=`` (see :func:`evaluate`)."""
SampleFn = Callable[..., list[str]]
"""``(prompts, *, temperature, seed) -> completions``, same length and order; one call is
seeded as a whole (its rows draw different tokens)."""

DEFAULT_BATCH_SIZE = 8


def predictions_path(out_dir: str | Path, suite_name: str) -> Path:
    """Where :func:`evaluate` writes the predictions of ``suite_name``."""
    return Path(out_dir) / f"{suite_name}.predictions.jsonl"


def scores_path(out_dir: str | Path, suite_name: str) -> Path:
    """Where :func:`evaluate` writes the final scores of ``suite_name``."""
    return Path(out_dir) / f"{suite_name}.scores.json"


def read_predictions(path: str | Path) -> list[Record]:
    """Records of a predictions file; a torn (crash-cut) final line is cut off the file itself."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    records, good_end = [], 0
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break  # a crash mid-write: everything before it is intact
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UserError(
                    f"{path}: corrupt record at byte {good_end} ({err.msg}); delete the line to resume"
                ) from err
        good_end += len(line)
    if good_end < len(data):
        with path.open("r+b") as f:
            f.truncate(good_end)
    return records


def _append_batch(path: Path, records: list[Record]) -> None:
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    with path.open("a", encoding="utf-8") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())


def _write_json_atomic(path: Path, obj: object) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _generate(generate_fn: GenerateFn, prompts: list[str], max_new_tokens: int | None) -> list[str]:
    if max_new_tokens is None:
        outputs = list(generate_fn(prompts))
    else:
        outputs = list(generate_fn(prompts, max_new_tokens=max_new_tokens))
    if len(outputs) != len(prompts):
        raise ValueError(
            f"generate_fn returned {len(outputs)} completions for {len(prompts)} prompts"
        )
    return outputs


def _batches(suite: Suite[S], todo: list[tuple[str, S]], batch_size: int):
    """(generation budget, up to ``batch_size`` samples) in order; samples with different
    budgets (``suite.max_new_tokens``) never share a batch. The budget is None without one."""
    groups: dict[int | None, list[tuple[str, S]]] = {}
    for item in todo:
        budget = None if suite.max_new_tokens is None else suite.max_new_tokens(item[1])
        groups.setdefault(budget, []).append(item)
    for budget, items in groups.items():
        for start in range(0, len(items), batch_size):
            yield budget, items[start : start + batch_size]


DoneSync = Callable[[set[str]], set[str]]
"""This rank's finished sample ids -> the ids finished on every rank that generates with it
(their intersection; :func:`eval.cli.done_on_every_rank`)."""


def _finished(done: dict[str, Record], done_everywhere: DoneSync | None) -> set[str]:
    return set(done) if done_everywhere is None else done_everywhere(set(done))


def evaluate(
    suite: Suite[S],
    samples: Sequence[S],
    generate_fn: GenerateFn,
    *,
    out_dir: str | Path,
    batch_size: int = DEFAULT_BATCH_SIZE,
    resume: bool = True,
    show_progress: bool = True,
    done_everywhere: DoneSync | None = None,
) -> dict[str, float]:
    """Generate, score and aggregate ``samples``; returns ``suite.aggregate`` over all records.

    Args:
        suite: the benchmark (see ``<benchmark>.make_suite``).
        samples: benchmark samples; their ``suite.sample_id`` must be unique.
        generate_fn: list of prompts -> list of completions, same length and order; called
            with ``max_new_tokens=`` as well when the suite sets per-sample budgets.
        out_dir: receives ``<suite.name>.predictions.jsonl`` and ``<suite.name>.scores.json``.
        batch_size: prompts per ``generate_fn`` call (and per flushed write).
        resume: skip samples already in the predictions file; False starts the file afresh.
        show_progress: draw a progress bar (rich) on the terminal.
        done_everywhere: for ranks that generate together (each with its own predictions
            file): maps this rank's finished ids to those finished on every rank
            (:data:`DoneSync`), so that all ranks make the same ``generate_fn`` calls after a
            resume; samples some rank lacks are generated again everywhere.

    File I/O only, no collectives of its own: one process, or every rank of a collective
    ``generate_fn`` with ``done_everywhere``.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    ids = [suite.sample_id(s) for s in samples]
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise UserError(
            f"suite {suite.name}: duplicate sample ids {dupes}; ids must be unique to resume"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pred_file = predictions_path(out, suite.name)
    if not resume and pred_file.exists():
        pred_file.unlink()
    wanted = set(ids)
    # Records of samples no longer asked for are kept on disk but not scored.
    done = {r["id"]: r for r in read_predictions(pred_file) if r.get("id") in wanted}
    finished = _finished(done, done_everywhere)
    todo = [(i, s) for i, s in zip(ids, samples) if i not in finished]

    with Progress(
        TextColumn(f"[bold]{suite.name}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=not show_progress,
    ) as progress:
        bar = progress.add_task(suite.name, total=len(ids), completed=len(finished))
        for budget, batch in _batches(suite, todo, batch_size):
            responses = _generate(generate_fn, [suite.build_prompt(s) for _, s in batch], budget)
            first_turn: list[str] | None = None
            if suite.followup_prompt is not None:
                first_turn = responses
                responses = _generate(
                    generate_fn,
                    [suite.followup_prompt(s, r) for (_, s), r in zip(batch, first_turn)],
                    budget,
                )
            records = []
            for k, ((sample_id, sample), response) in enumerate(zip(batch, responses)):
                record: Record = {
                    "id": sample_id,
                    **suite.score_sample(sample, response),
                    "response": response,
                }
                if first_turn is not None:
                    record["response_first_turn"] = first_turn[k]
                records.append(record)
                done[sample_id] = record
            _append_batch(pred_file, records)
            progress.advance(bar, len(batch))

    scores = suite.aggregate([done[i] for i in ids])
    _write_json_atomic(scores_path(out, suite.name), scores)
    return scores


CORRECT_KEY = "correct"
"""Record field holding a 0/1 correctness; suites that score one get pass@k."""


def sampled_suite_name(suite_name: str, temperature: float) -> str:
    """File stem of the sampled pass of ``suite_name`` at ``temperature`` (``synthetic_kv.T1``)."""
    return f"{suite_name}.T{temperature:g}"


def sampled_scores(
    suite: Suite, records: Sequence[Record], *, num_samples: int, temperature: float
) -> dict[str, float]:
    """Scores of k samples per prompt, in percent.

    For every column of ``suite.aggregate``: the mean over all k x n responses (mean@k; each
    prompt weighs the same) and ``"<column> SE"``, the standard error of the per-prompt
    aggregates over the n prompts (:func:`stats.mean_and_se`). With a 0/1 ``correct`` field,
    ``"pass@<j>"`` (unbiased estimator, :func:`stats.pass_at_k`) and its SE for the
    :func:`stats.pass_ks` of k. Also ``samples_per_prompt`` (k) and ``temperature``.
    """
    flat = [s for r in records for s in r["samples"]]
    scores = dict(suite.aggregate(flat))
    per_prompt = [suite.aggregate(r["samples"]) for r in records]
    for column in [c for c in scores if c != "num_samples"]:  # num_samples: a count
        scores[f"{column} SE"] = mean_and_se([p.get(column, float("nan")) for p in per_prompt])[1]
    if flat and all(CORRECT_KEY in s for s in flat):
        for k in pass_ks(num_samples):
            mean, se = mean_and_se([
                100.0 * pass_at_k(len(r["samples"]), round(sum(s[CORRECT_KEY] for s in
                                                              r["samples"])), k)
                for r in records
            ])  # fmt: skip
            scores[f"pass@{k}"], scores[f"pass@{k} SE"] = mean, se
    scores["samples_per_prompt"], scores["temperature"] = float(num_samples), float(temperature)
    return scores


def evaluate_sampled(
    suite: Suite[S],
    samples: Sequence[S],
    sample_fn: SampleFn,
    *,
    num_samples: int,
    temperature: float,
    seed: int,
    out_dir: str | Path,
    batch_size: int = DEFAULT_BATCH_SIZE,
    resume: bool = True,
    show_progress: bool = True,
    done_everywhere: DoneSync | None = None,
) -> dict[str, float]:
    """k = ``num_samples`` responses per prompt at ``temperature``; returns :func:`sampled_scores`.

    Writes ``<stem>.predictions.jsonl`` (one line per prompt: ``{"id", "samples": [record, ...]}``,
    each record as :func:`evaluate` writes it) and ``<stem>.scores.json``, where ``<stem>`` is
    :func:`sampled_suite_name`. ``batch_size`` prompts (x k rows) per ``sample_fn`` call, seeded
    by :func:`call_seed` from ``seed`` and the batch's first prompt: a whole run is reproducible
    (a resumed one draws fresh samples for what it generates). Resume skips prompts that have k
    samples on disk. One process, or every rank with ``done_everywhere``, as :func:`evaluate`.
    """
    if num_samples < 1 or temperature <= 0:
        raise UserError(
            f"sampled evaluation needs num_samples >= 1 and temperature > 0, got {num_samples}, "
            f"{temperature}; set eval.num_samples and eval.sample_temperature"
        )
    if suite.followup_prompt is not None:
        raise ValueError(f"suite {suite.name}: no sampled metrics for two-turn suites")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    name = sampled_suite_name(suite.name, temperature)
    ids = [suite.sample_id(s) for s in samples]
    if len(set(ids)) != len(ids):
        raise ValueError(f"suite {suite.name}: duplicate sample ids; ids must be unique to resume")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pred_file = predictions_path(out, name)
    if not resume and pred_file.exists():
        pred_file.unlink()
    wanted = set(ids)
    done = {r["id"]: r for r in read_predictions(pred_file)
            if r.get("id") in wanted and len(r.get("samples", ())) == num_samples}  # fmt: skip
    finished = _finished(done, done_everywhere)
    todo = [(n, i, s) for n, (i, s) in enumerate(zip(ids, samples)) if i not in finished]
    with Progress(TextColumn(f"[bold]{name}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), disable=not show_progress) as progress:  # fmt: skip
        bar = progress.add_task(name, total=len(ids), completed=len(finished))
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            prompts = [suite.build_prompt(s) for _, _, s in batch for _ in range(num_samples)]
            responses = list(sample_fn(prompts, temperature=temperature,
                                       seed=call_seed(seed, batch[0][0])))  # fmt: skip
            if len(responses) != len(prompts):
                raise ValueError(
                    f"sample_fn returned {len(responses)} completions for {len(prompts)} prompts"
                )
            records = []
            for k, (_, sample_id, sample) in enumerate(batch):
                mine = responses[k * num_samples : (k + 1) * num_samples]
                record = {"id": sample_id, "samples": [
                    {**suite.score_sample(sample, r), "response": r} for r in mine
                ]}  # fmt: skip
                records.append(record)
                done[sample_id] = record
            _append_batch(pred_file, records)
            progress.advance(bar, len(batch))
    scores = sampled_scores(suite, [done[i] for i in ids], num_samples=num_samples,
                            temperature=temperature)  # fmt: skip
    _write_json_atomic(scores_path(out, name), scores)
    return scores


def paired_difference(
    suite: Suite, records: Sequence[Record], baseline: Sequence[Record], column: str
) -> tuple[float, float, int]:
    """Mean and standard error of the per-prompt difference ``records - baseline`` of one
    ``suite.aggregate`` column, over the prompts both sampled files hold (their third value).

    Two models scored on the same prompts share each prompt's difficulty; the paired error
    removes it (Student's paired t), the independent sqrt(e1^2 + e2^2) does not.
    """
    base = {r["id"]: suite.aggregate(r["samples"]).get(column, float("nan")) for r in baseline}
    diffs = [suite.aggregate(r["samples"]).get(column, float("nan")) - base[r["id"]]
             for r in records if r["id"] in base]  # fmt: skip
    mean, se = mean_and_se(diffs)
    return mean, se, len(diffs)
