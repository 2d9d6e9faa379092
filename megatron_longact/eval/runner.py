"""Backend-agnostic evaluation loop: prompts in batches, predictions to disk, scores out.

``generate_fn`` is whatever turns prompts into completions (vLLM, a megatron inference engine,
a test stub); this module imports none of them. Each finished batch is appended to
``<out_dir>/<suite>.predictions.jsonl`` with one ``write`` followed by flush and fsync, so a
crash loses at most the batch in flight; a rerun skips the ids already on disk (a torn last
line from a crash is dropped) and scores everything at the end from the file, as LongBench's
``pred.py`` caches and ``result.py`` scores.
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

S = TypeVar("S")
GenerateFn = Callable[..., list[str]]
"""``(prompts) -> completions``, also called with ``max_new_tokens=`` (see :func:`evaluate`)."""

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


def evaluate(
    suite: Suite[S],
    samples: Sequence[S],
    generate_fn: GenerateFn,
    *,
    out_dir: str | Path,
    batch_size: int = DEFAULT_BATCH_SIZE,
    resume: bool = True,
    show_progress: bool = True,
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

    Call it on one process (rank 0) -- it does file I/O and no collectives.
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
    todo = [(i, s) for i, s in zip(ids, samples) if i not in done]

    with Progress(
        TextColumn(f"[bold]{suite.name}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=not show_progress,
    ) as progress:
        bar = progress.add_task(suite.name, total=len(ids), completed=len(done))
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
