"""``longact eval``: run the configured suites and write the paper-style tables."""

from __future__ import annotations

import logging
from pathlib import Path

import torch.distributed as dist

from megatron_longact.config.schema import JobConfig
from megatron_longact.data.tokenizer import TINY_TOKENIZER_DIR, load_tokenizer
from megatron_longact.eval import infinitebench, longbench_v2, ruler, synthetic_kv
from megatron_longact.eval.backends import native_backend, vllm_backend
from megatron_longact.eval.report import (
    INFINITEBENCH_TABLE,
    LONGBENCH_V2_TABLE,
    TableSpec,
    load_scores,
    ruler_row,
    ruler_table,
    write_report,
)
from megatron_longact.eval.runner import evaluate, scores_path

logger = logging.getLogger(__name__)
KV_TABLE = TableSpec("Held-out synthetic key-value retrieval (%)", synthetic_kv.COLUMNS)


def _length_label(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)


def _runs(job: JobConfig, tokenizer) -> list[tuple[str, object, list]]:
    """(table name, suite, samples) for every configured suite; errors name missing inputs."""
    ev = job.eval
    runs = []
    for name in ev.suites:
        if name == "synthetic_kv":
            if ev.synthetic_kv_path is None:
                raise ValueError("eval.suites has synthetic_kv: set eval.synthetic_kv_path")
            runs.append(("synthetic_kv", synthetic_kv.make_suite(),
                         synthetic_kv.load_synthetic_kv(ev.synthetic_kv_path)))  # fmt: skip
        elif name == "ruler":
            for length in ev.ruler_lengths:
                samples = ruler.generate_ruler(max_seq_length=length, tokenizer=tokenizer,
                                               num_samples=ev.ruler_num_samples,
                                               tasks=ev.ruler_tasks, seed=ev.seed)  # fmt: skip
                suite = ruler.make_suite(name=f"ruler-{_length_label(length)}")
                runs.append(("ruler", suite, samples))
        elif name == "longbench_v2":
            if ev.longbench_v2_path is None:
                raise ValueError("eval.suites has longbench_v2: set eval.longbench_v2_path")
            suite = longbench_v2.make_suite(style="answer_tag", tokenizer=tokenizer,
                                            max_prompt_tokens=ev.max_prompt_tokens)  # fmt: skip
            runs.append(("longbench_v2", suite,
                         longbench_v2.load_longbench_v2(ev.longbench_v2_path)))  # fmt: skip
        elif name == "infinitebench":
            if ev.infinitebench_dir is None:
                raise ValueError("eval.suites has infinitebench: set eval.infinitebench_dir")
            suite = infinitebench.make_suite(
                tokenizer=tokenizer, max_prompt_tokens=ev.max_prompt_tokens
            )
            runs.append(("infinitebench", suite,
                         infinitebench.load_infinitebench(ev.infinitebench_dir)))  # fmt: skip
        else:
            raise ValueError(
                f"eval.suites: unknown suite {name!r}; use synthetic_kv, ruler, longbench_v2, "
                "infinitebench"
            )
    return runs


def _tables(job: JobConfig, runs) -> list[Path]:
    """One markdown + CSV table per benchmark, rows = this model and ``eval.compare`` dirs."""
    ev = job.eval
    dirs = {}
    for other in ev.compare:  # compared models first: the table reads top-down like the paper's
        label_file = Path(other) / "model_name.txt"
        label = label_file.read_text().strip() if label_file.is_file() else Path(other).name
        dirs[label] = Path(other)
    dirs[ev.model_name] = Path(ev.out_dir)
    written = []
    for table in dict.fromkeys(t for t, _, _ in runs):
        suites = [s.name for t, s, _ in runs if t == table]
        rows = {}
        for label, folder in dirs.items():
            scores = {s: load_scores(scores_path(folder, s)) for s in suites}
            if table == "ruler":
                rows[label] = ruler_row({s.removeprefix("ruler-"): v for s, v in scores.items()})
            else:
                rows[label] = scores[suites[0]]
        spec = {
            "synthetic_kv": KV_TABLE,
            "longbench_v2": LONGBENCH_V2_TABLE,
            "infinitebench": INFINITEBENCH_TABLE,
            "ruler": ruler_table([s.removeprefix("ruler-") for s in suites]),
        }[table]
        # Difference rows are "this model vs the first compared one" (e.g. RL vs SFT).
        baseline = next(iter(rows)) if len(rows) > 1 else None
        md, _ = write_report(rows, spec, out_path=Path(ev.out_dir) / f"table_{table}",
                             baseline=baseline)  # fmt: skip
        written.append(md)
    return written


def run_eval(job: JobConfig) -> list[Path]:
    """Generates, scores and tabulates; returns the markdown tables (rank 0 writes them)."""
    tokenizer = load_tokenizer(job.data.tokenizer_path or TINY_TOKENIZER_DIR)
    backend = native_backend if job.eval.backend == "native" else vllm_backend
    generate = backend(job, tokenizer)
    runs = _runs(job, tokenizer)
    is_writer = not dist.is_initialized() or dist.get_rank() == 0
    out_dir = Path(job.eval.out_dir)
    for _, suite, samples in runs:
        scores = evaluate(suite, samples, generate, out_dir=out_dir if is_writer else
                          out_dir / f".rank{dist.get_rank()}", batch_size=job.eval.batch_size,
                          show_progress=is_writer and job.logging.progress)  # fmt: skip
        logger.info("%s: %s", suite.name, scores)
    if not is_writer:
        return []
    (out_dir / "model_name.txt").write_text(job.eval.model_name + "\n")
    tables = _tables(job, runs)
    for table in tables:
        print(table.read_text())
    return tables
