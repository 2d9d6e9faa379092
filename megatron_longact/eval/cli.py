"""``longact eval``: run the configured suites and write the paper-style tables."""

from __future__ import annotations

import logging
from pathlib import Path

import torch.distributed as dist

from megatron_longact.config.schema import JobConfig
from megatron_longact.data.tokenizer import TINY_TOKENIZER_DIR, load_tokenizer
from megatron_longact.errors import UserError
from megatron_longact.eval import infinitebench, longbench_v2, ruler, synthetic_kv
from megatron_longact.eval.backends import (
    DEFAULT_MAX_NEW_TOKENS,
    Backend,
    chat_prompt,
    eval_batch_size,
    has_chat_template,
    native_backend,
    suite_generate,
    vllm_backend,
)
from megatron_longact.eval.report import (
    INFINITEBENCH_TABLE,
    LONGBENCH_V2_TABLE,
    TableSpec,
    add_greedy_errors,
    add_sampled_columns,
    load_scores,
    ruler_row,
    ruler_table,
    write_report,
)
from megatron_longact.eval.ruler import files as ruler_files
from megatron_longact.eval.ruler.qa import load_hotpotqa_pool, load_squad_pool
from megatron_longact.eval.runner import (
    evaluate,
    evaluate_sampled,
    sampled_suite_name,
    scores_path,
)
from megatron_longact.models.hf_config import read_hf_config, resolve_model_dir

logger = logging.getLogger(__name__)
KV_TABLE = TableSpec("Held-out synthetic key-value retrieval (%)", synthetic_kv.COLUMNS)


def _length_label(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)


def context_window(job: JobConfig) -> int | None:
    """Tokens the evaluated model attends over: ``model.max_position_embeddings``, else the
    ``max_position_embeddings`` of its HF config (``eval.hf_dir`` for vLLM); None if unknown."""
    if job.model.max_position_embeddings:
        return job.model.max_position_embeddings
    try:
        if job.eval.backend == "vllm" and job.eval.hf_dir is not None:
            folder = job.eval.hf_dir
        else:
            folder = resolve_model_dir(hf_path=job.model.hf_path, preset=job.model.preset)
        return int(read_hf_config(folder)["max_position_embeddings"])
    except (FileNotFoundError, KeyError, ValueError):
        return None


def prompt_budget(
    job: JobConfig, tokenizer, *, official: int, system: str | None, max_new_tokens: int
) -> int:
    """Middle-truncation budget of one benchmark's prompts, in tokens.

    ``eval.max_prompt_tokens`` when set; else the benchmark's ``official`` budget, capped so the
    prompt, its chat template (and ``system`` turn) and ``max_new_tokens`` (the largest
    generation budget of its samples) fit the model's context window. Raises UserError when
    nothing fits.
    """
    if job.eval.max_prompt_tokens is not None:
        return job.eval.max_prompt_tokens
    window = context_window(job)
    if window is None:
        return official
    scaffold = chat_prompt(tokenizer, "", system=system)
    room = window - max_new_tokens - len(tokenizer.encode(scaffold, add_special_tokens=False))
    if room <= 0:
        raise UserError(
            f"the model's context window ({window} tokens) leaves no room for a prompt after "
            f"{max_new_tokens} generated tokens; set eval.max_new_tokens lower or "
            "eval.max_prompt_tokens"
        )
    return min(official, room)


def _ruler_runs(job: JobConfig, tokenizer) -> list[tuple[str, object, list]]:
    """RULER's own files (``eval.ruler_data_dirs``, sent as is), else generated samples."""
    ev = job.eval
    runs = []
    for data_dir in ev.ruler_data_dirs:
        samples = ruler_files.load_ruler_dir(data_dir)
        for length in sorted({s.max_seq_length for s in samples}):
            suite = ruler.make_suite(name=f"ruler-{_length_label(length)}", chat_template=False)
            runs.append(("ruler", suite, [s for s in samples if s.max_seq_length == length]))
    if ev.ruler_data_dirs:
        return runs
    pools = {}
    for task, path, field, load in (("qa_1", ev.ruler_squad_path, "ruler_squad_path", load_squad_pool),
                                    ("qa_2", ev.ruler_hotpotqa_path, "ruler_hotpotqa_path",
                                     load_hotpotqa_pool)):  # fmt: skip
        if task in ev.ruler_tasks:
            if path is None:
                raise UserError(f"eval.ruler_tasks has {task}: set eval.{field}")
            pools[task] = load(path)
    essay = (
        ruler_files.load_haystack_text(ev.ruler_haystack_path) if ev.ruler_haystack_path else None
    )
    for length in ev.ruler_lengths:
        samples = ruler.generate_ruler(max_seq_length=length, tokenizer=tokenizer,
                                       num_samples=ev.ruler_num_samples, tasks=ev.ruler_tasks,
                                       seed=ev.seed, qa_pools=pools, essay_text=essay)  # fmt: skip
        runs.append(("ruler", ruler.make_suite(name=f"ruler-{_length_label(length)}"), samples))
    return runs


def suite_runs(job: JobConfig, tokenizer) -> list[tuple[str, object, list]]:
    """(table name, suite, samples) for every configured suite; errors name missing inputs."""
    ev = job.eval
    runs = []
    for name in ev.suites:
        if name == "synthetic_kv":
            if ev.synthetic_kv_path is None:
                raise UserError("eval.suites has synthetic_kv: set eval.synthetic_kv_path")
            runs.append(("synthetic_kv", synthetic_kv.make_suite(),
                         synthetic_kv.load_synthetic_kv(ev.synthetic_kv_path)))  # fmt: skip
        elif name == "ruler":
            runs += _ruler_runs(job, tokenizer)
        elif name == "longbench_v2":
            if ev.longbench_v2_path is None:
                raise UserError("eval.suites has longbench_v2: set eval.longbench_v2_path")
            style = "0shot" if ev.prompt_style == "official" else "answer_tag"
            budget = prompt_budget(job, tokenizer, system=None,
                                   official=longbench_v2.DEFAULT_MAX_PROMPT_TOKENS,
                                   max_new_tokens=ev.max_new_tokens or DEFAULT_MAX_NEW_TOKENS)  # fmt: skip
            suite = longbench_v2.make_suite(
                style=style, tokenizer=tokenizer, max_prompt_tokens=budget
            )
            runs.append(("longbench_v2", suite,
                         longbench_v2.load_longbench_v2(ev.longbench_v2_path)))  # fmt: skip
        elif name == "infinitebench":
            if ev.infinitebench_dir is None:
                raise UserError("eval.suites has infinitebench: set eval.infinitebench_dir")
            chat = has_chat_template(tokenizer)
            samples = infinitebench.load_infinitebench(ev.infinitebench_dir)
            # The official per-task budgets unless eval.max_new_tokens overrides them all.
            longest = ev.max_new_tokens or max(
                (infinitebench.MAX_NEW_TOKENS[s.task] for s in samples), default=0
            )
            budget = prompt_budget(job, tokenizer,
                                   system=infinitebench.CHAT_SYSTEM_MESSAGE if chat else None,
                                   official=infinitebench.DEFAULT_MAX_PROMPT_TOKENS,
                                   max_new_tokens=longest)  # fmt: skip
            suite = infinitebench.make_suite(templates="chat" if chat else "base",
                                             tokenizer=tokenizer, max_prompt_tokens=budget,
                                             max_new_tokens=ev.max_new_tokens)  # fmt: skip
            runs.append(("infinitebench", suite, samples))
        else:
            raise UserError(
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
        if table != "ruler" and ev.num_samples > 0:  # greedy ± SE, then mean@k ± SE beside it
            suite = next(s for t, s, _ in runs if t == table)
            spec = add_greedy_errors(spec, rows, dirs, suite=suite)
            name = sampled_suite_name(suite.name, ev.sample_temperature)
            spec = add_sampled_columns(spec, rows, dirs, suite=suite, name=name)
        # Difference rows are "this model vs the first compared one" (e.g. RL vs SFT).
        baseline = next(iter(rows)) if len(rows) > 1 else None
        md, _ = write_report(rows, spec, out_path=Path(ev.out_dir) / f"table_{table}",
                             baseline=baseline)  # fmt: skip
        written.append(md)
    return written


def done_on_every_rank(done: set[str]) -> set[str]:
    """The sample ids finished on every rank (:data:`runner.DoneSync`). Collective over the
    world."""
    gathered: list[set[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, done)
    return set.intersection(*gathered)


def run_eval(job: JobConfig, *, backend: Backend | None = None) -> list[Path]:
    """Generates, scores and tabulates; returns the markdown tables (rank 0 writes them).

    ``backend`` defaults to ``eval.backend`` (native or vLLM); any ``(job, tokenizer) ->
    complete(model_inputs)`` works, e.g. to record the exact model inputs.
    """
    tokenizer = load_tokenizer(job.data.tokenizer_path or TINY_TOKENIZER_DIR)
    if backend is None:
        backend = native_backend if job.eval.backend == "native" else vllm_backend
    complete = backend(job, tokenizer)
    runs = suite_runs(job, tokenizer)
    is_writer = not dist.is_initialized() or dist.get_rank() == 0
    out_dir = Path(job.eval.out_dir)
    # Every rank generates (collectives inside the backend) and keeps its own predictions, so
    # a resumed rank can differ from the others by the batch it was writing when killed.
    rank_dir = out_dir if is_writer else out_dir / f".rank{dist.get_rank()}"
    sync = done_on_every_rank if dist.is_initialized() and dist.get_world_size() > 1 else None
    common = dict(out_dir=rank_dir, show_progress=is_writer and job.logging.progress,
                  done_everywhere=sync)  # fmt: skip
    for _, suite, samples in runs:
        generate = suite_generate(
            complete, tokenizer, suite, max_new_tokens=job.eval.max_new_tokens
        )
        scores = evaluate(suite, samples, generate, batch_size=eval_batch_size(job), **common)
        logger.info("%s: %s", suite.name, scores)
        if job.eval.num_samples > 0 and suite.followup_prompt is None:
            scores = evaluate_sampled(suite, samples, generate, num_samples=job.eval.num_samples,
                                      temperature=job.eval.sample_temperature, seed=job.eval.seed,
                                      batch_size=job.eval.batch_size, **common)  # fmt: skip
            logger.info("%s sampled: %s", suite.name, scores)
    if not is_writer:
        return []
    (out_dir / "model_name.txt").write_text(job.eval.model_name + "\n")
    tables = _tables(job, runs)
    for table in tables:
        print(table.read_text())
    return tables
