"""Results tables laid out like the paper's Tables 1-3: one row per model, the paper's columns.

Rows map a model name (e.g. "Qwen3-8B-SFT w/ LongAct") to the score dict a suite's ``aggregate``
returned (or :func:`load_scores` read back). Several models in one table compare them (SFT vs
DAPO vs LongAct); ``baseline=`` adds rows with each model's difference to that one.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from megatron_longact.errors import UserError
from megatron_longact.eval.infinitebench import TABLE3_COLUMNS
from megatron_longact.eval.longbench_v2 import TABLE1_COLUMNS
from megatron_longact.eval.ruler.config import TABLE2_COLUMNS
from megatron_longact.eval.runner import (
    paired_difference,
    predictions_path,
    read_predictions,
    sampled_scores,
    scores_path,
)
from megatron_longact.eval.suite import Suite

Scores = Mapping[str, float]
DECIMALS = 2  # the paper reports percentages with two decimals
MISSING = "-"
PAIRED = "paired"
"""Suffix of a row's key holding the paired standard error of its difference to the baseline."""
# The paper's Table 2 context lengths, as (label, tokens).
PAPER_RULER_LENGTHS = (("128k", 131072), ("64k", 65536))


@dataclass(frozen=True)
class TableSpec:
    """A table's title and its score columns (keys of the rows' score dicts, shown as named)."""

    title: str
    columns: tuple[str, ...]
    errors: tuple[tuple[str, str], ...] = ()
    """(column, key of its standard error in the rows): shown as ``value ± error``. A difference
    row's error is the row's ``"<error key> paired"`` when it holds one (the SE of the per-prompt
    differences to the baseline on the same prompts, :func:`runner.paired_difference`), else
    sqrt(e1^2 + e2^2) (independent errors: conservative for models scored on the same prompts)."""


def with_sampled(spec: TableSpec, scores: Scores, sampled: Scores | None) -> tuple[TableSpec, dict]:
    """``spec`` and one row's ``scores`` extended by a sampled pass (``runner.sampled_scores``):
    ``<column> mean@k`` ± SE for every column, then ``pass@k``. ``sampled`` None: unchanged."""
    if sampled is None:
        return spec, dict(scores)
    k = int(sampled["samples_per_prompt"])
    row, columns, errors = dict(scores), list(spec.columns), list(spec.errors)
    for name in [*spec.columns, f"pass@{k}"]:
        if name not in sampled:
            continue
        label = name if name.startswith("pass@") else f"{name} mean@{k}"
        row[label], row[f"{label} SE"] = sampled[name], sampled.get(f"{name} SE", math.nan)
        columns.append(label)
        errors.append((label, f"{label} SE"))
    title = f"{spec.title}; mean@{k} and pass@{k}: {k} samples at T={sampled['temperature']:g}"
    return TableSpec(title, tuple(columns), tuple(errors)), row


LONGBENCH_V2_TABLE = TableSpec("Evaluation results (%) on LongBench v2", TABLE1_COLUMNS)
INFINITEBENCH_TABLE = TableSpec("Evaluation results (%) on InfiniteBench", TABLE3_COLUMNS)


def ruler_table(
    lengths: Sequence[str] = tuple(label for label, _ in PAPER_RULER_LENGTHS),
) -> TableSpec:
    """Table 2's layout: for each length label, NIAH-sub, NIAH, VT, QA and Avg."""
    columns = tuple(f"Ruler-{length} {col}" for length in lengths for col in TABLE2_COLUMNS)
    return TableSpec(
        f"Evaluation results (%) on {' and '.join(f'Ruler-{x}' for x in lengths)}", columns
    )


def ruler_row(scores_by_length: Mapping[str, Scores]) -> dict[str, float]:
    """Flatten {length label: RULER scores} into one row of :func:`ruler_table`."""
    return {
        f"Ruler-{length} {col}": value
        for length, scores in scores_by_length.items()
        for col, value in scores.items()
    }


def load_scores(path: str | Path) -> dict[str, float]:
    """Read a ``<suite>.scores.json`` written by the runner."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run runner.evaluate first or check out_dir")
    return json.loads(path.read_text(encoding="utf-8"))


def _value(scores: Scores, column: str) -> float | None:
    value = scores.get(column)
    return None if value is None or math.isnan(value) else float(value)


def _with_deltas(
    rows: Mapping[str, Scores], spec: TableSpec, baseline: str | None
) -> list[tuple[str, dict[str, float | None], bool]]:
    """(name, values, is_delta) for every row, delta rows after the models; values hold the
    columns and their error keys."""
    errors = dict(spec.errors)
    keys = [*spec.columns, *errors.values()]
    table = [(name, {c: _value(s, c) for c in keys}, False) for name, s in rows.items()]
    if baseline is None:
        return table
    if baseline not in rows:
        raise UserError(f"baseline {baseline!r} is not a row; rows are {list(rows)}")
    base = table[[name for name, _, _ in table].index(baseline)][1]
    for name, values, _ in list(table):
        if name == baseline:
            continue
        deltas = {
            c: (values[c] - base[c]) if values[c] is not None and base[c] is not None else None
            for c in spec.columns
        }
        for e in errors.values():
            both = values[e] is not None and base[e] is not None
            deltas[e] = _value(rows[name], f"{e} {PAIRED}")
            if deltas[e] is None:
                deltas[e] = math.hypot(values[e], base[e]) if both else None
        table.append((f"{name} vs {baseline}", deltas, True))
    return table


def _fmt(value: float | None, *, signed: bool) -> str:
    if value is None:
        return MISSING
    return f"{value:+.{DECIMALS}f}" if signed else f"{value:.{DECIMALS}f}"


def render_markdown(
    rows: Mapping[str, Scores],
    spec: TableSpec,
    *,
    baseline: str | None = None,
    bold_best: bool = True,
) -> str:
    """A markdown table: title line, header ``Model | <columns>``, one line per row.

    The best model value of each column is bold (as in the paper); delta rows show signs.
    """
    table = _with_deltas(rows, spec, baseline)
    errors = dict(spec.errors)
    best = {}
    for c in spec.columns:
        values = [v[c] for _, v, is_delta in table if not is_delta and v[c] is not None]
        best[c] = max(values) if values and len(rows) > 1 else None
    lines = [f"**{spec.title}**", "", "| Model | " + " | ".join(spec.columns) + " |"]
    lines.append("|" + "---|" * (len(spec.columns) + 1))
    for name, values, is_delta in table:
        cells = []
        for c in spec.columns:
            text = _fmt(values[c], signed=is_delta)
            if (
                bold_best
                and not is_delta
                and best[c] is not None
                and values[c] is not None
                and round(values[c], DECIMALS) == round(best[c], DECIMALS)
            ):
                text = f"**{text}**"
            if c in errors and values[c] is not None and values[errors[c]] is not None:
                text += f" ± {values[errors[c]]:.{DECIMALS}f}"
            cells.append(text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_csv(rows: Mapping[str, Scores], spec: TableSpec, *, baseline: str | None = None) -> str:
    """CSV with header ``Model,<columns>`` (a column's error key after it); values rounded to two
    decimals, missing cells empty."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    keys = [k for c in spec.columns for k in (c, dict(spec.errors).get(c)) if k is not None]
    writer.writerow(["Model", *keys])
    for name, values, _ in _with_deltas(rows, spec, baseline):
        writer.writerow(
            [name, *("" if values[k] is None else f"{values[k]:.{DECIMALS}f}" for k in keys)]
        )
    return buffer.getvalue()


def write_report(
    rows: Mapping[str, Scores],
    spec: TableSpec,
    *,
    out_path: str | Path,
    baseline: str | None = None,
) -> tuple[Path, Path]:
    """Write ``<out_path>.md`` and ``<out_path>.csv``; returns both paths."""
    if not rows:
        raise ValueError("no rows to report; pass {model name: scores}")
    stem = Path(out_path)
    stem.parent.mkdir(parents=True, exist_ok=True)
    md_path, csv_path = Path(f"{stem}.md"), Path(f"{stem}.csv")
    md_path.write_text(render_markdown(rows, spec, baseline=baseline), encoding="utf-8")
    csv_path.write_text(render_csv(rows, spec, baseline=baseline), encoding="utf-8")
    return md_path, csv_path


def _set_paired_errors(
    rows: dict[str, dict[str, float]],
    records: Mapping[str, list],
    errors: Mapping[str, str],
    *,
    suite: Suite,
) -> None:
    """For every row after the first whose predictions are in ``records`` (as is the first's):
    ``"<error> paired"``, the SE of its per-prompt differences to the first row, for each
    ``{score column of suite.aggregate: error key}`` of ``errors``."""
    baseline, *others = list(rows)
    for label in others:
        if label in records and baseline in records:
            for source, error in errors.items():
                diff = paired_difference(suite, records[label], records[baseline], source)
                rows[label][f"{error} {PAIRED}"] = diff[1]


def add_greedy_errors(
    spec: TableSpec, rows: dict[str, dict[str, float]], dirs: Mapping[str, Path], *, suite: Suite
) -> TableSpec:
    """Extends ``spec`` and, in place, every row whose folder in ``dirs`` holds greedy
    predictions of ``suite`` by the standard error over prompts of each column (one answer per
    prompt: for a 0/1 score the binomial SE); rows after the first also get the paired SE of
    their difference to it, as the sampled pass's columns do (:func:`add_sampled_columns`)."""
    records = {}
    for label, folder in dirs.items():
        file = predictions_path(folder, suite.name)
        if file.is_file():  # one greedy answer per prompt: a group of one sample
            records[label] = [{"id": r["id"], "samples": [r]} for r in read_predictions(file)]
    errors = {c: f"{c} SE" for c in spec.columns if c not in dict(spec.errors)}
    for label, recs in records.items():
        scores = sampled_scores(suite, recs, num_samples=1, temperature=0.0)
        rows[label].update({e: scores.get(e, math.nan) for e in errors.values()})
    _set_paired_errors(rows, records, errors, suite=suite)
    return TableSpec(spec.title, spec.columns, (*spec.errors, *errors.items()))


def add_sampled_columns(
    spec: TableSpec,
    rows: dict[str, dict[str, float]],
    dirs: Mapping[str, Path],
    *,
    suite: Suite,
    name: str,
) -> TableSpec:
    """Extends ``spec`` and, in place, every row whose folder in ``dirs`` holds the sampled pass
    ``name`` (``runner.sampled_suite_name``) by its ``mean@k`` ± SE columns (:func:`with_sampled`);
    rows after the first also get the paired SE of their difference to it (:data:`PAIRED`)."""
    extended = spec
    for label, folder in dirs.items():
        file = scores_path(folder, name)
        if file.is_file():
            extended, rows[label] = with_sampled(spec, rows[label], load_scores(file))
    files = {label: predictions_path(folder, name) for label, folder in dirs.items()}
    records = {label: read_predictions(f) for label, f in files.items() if f.is_file()}
    errors = {c.split(" mean@")[0]: e for c, e in extended.errors if " mean@" in c}
    _set_paired_errors(rows, records, errors, suite=suite)
    return extended
