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

from collections.abc import Callable
from dataclasses import replace

from megatron_longact.config.schema import JobConfig
from megatron_longact.data.chat_template import render_chat, resolve_chat_template
from megatron_longact.data.tokenizer import pad_id
from megatron_longact.eval.runner import GenerateFn
from megatron_longact.eval.suite import Suite

CompleteFn = Callable[..., list[str]]
"""Model inputs (chat template applied) -> completions, same length and order. Keywords
``temperature`` and ``seed`` override ``eval.temperature`` / ``eval.seed`` for one call (the
sampled pass of ``eval.num_samples``)."""
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


def suite_generate(complete: CompleteFn, tokenizer, suite: Suite) -> GenerateFn:
    """The runner's ``prompts -> responses`` for ``suite``: template, then ``complete``."""

    def generate(prompts: list[str], **sampling) -> list[str]:
        if not suite.chat_template:
            return complete(list(prompts), **sampling)
        return complete(
            [chat_prompt(tokenizer, p, system=suite.system_prompt) for p in prompts], **sampling
        )

    return generate


def native_backend(job: JobConfig, tokenizer) -> CompleteFn:
    """Greedy (temperature 0) or sampled decoding with the megatron model. All ranks call the
    returned function with the same prompts (TP collectives); DP ranks all decode everything."""
    from megatron_longact.models.gpt import load_architecture, make_transformer_config
    from megatron_longact.rl.rollout.factory import stop_token_ids
    from megatron_longact.rl.rollout.native import NativeEngine
    from megatron_longact.rl.rollout.types import SamplingParams
    from megatron_longact.runtime.distributed import init_distributed
    from megatron_longact.runtime.setup import build_frozen_model

    if job.checkpoint.load_dir is None:
        raise ValueError("eval.backend=native needs checkpoint.load_dir (a megatron checkpoint)")
    dims = init_distributed(job.parallel, seed=job.train.seed)
    arch = load_architecture(job.model)
    config = make_transformer_config(arch, model=job.model, parallel=job.parallel, train=job.train)
    model = build_frozen_model(job, arch=arch, transformer_config=config, dims=dims,
                               load_dir=job.checkpoint.load_dir)  # fmt: skip
    pad = pad_id(tokenizer)
    engine = NativeEngine(model, pad_token_id=pad, batch_size=job.eval.batch_size)
    params = SamplingParams(
        temperature=job.eval.temperature,
        max_new_tokens=job.eval.max_new_tokens,
        stop_token_ids=stop_token_ids(tokenizer, []),
        seed=job.eval.seed,
    )
    stops = set(params.stop_token_ids)

    def generate(model_inputs: list[str], *, temperature: float | None = None,
                 seed: int | None = None) -> list[str]:  # fmt: skip
        ids = [tokenizer.encode(text, add_special_tokens=False) for text in model_inputs]
        outputs = engine.generate(ids, replace(
            params, temperature=params.temperature if temperature is None else temperature,
            seed=params.seed if seed is None else seed))  # fmt: skip
        return [
            tokenizer.decode(
                [t for t in out.response_ids if t not in stops], skip_special_tokens=False
            )  # fmt: skip
            for out in outputs
        ]

    return generate


def vllm_backend(job: JobConfig, tokenizer) -> CompleteFn:
    """vLLM offline generation from ``eval.hf_dir`` (seed and temperature as configured)."""
    try:
        import vllm
    except ImportError as err:
        raise ValueError("eval.backend=vllm needs vLLM: pip install -e '.[vllm]'") from err
    if job.eval.hf_dir is None:
        raise ValueError("eval.backend=vllm needs eval.hf_dir (an exported Hugging Face folder)")
    llm = vllm.LLM(
        model=job.eval.hf_dir,
        tensor_parallel_size=job.parallel.tensor_model_parallel_size,
        seed=job.eval.seed,
    )
    sampling = vllm.SamplingParams(
        temperature=job.eval.temperature, max_tokens=job.eval.max_new_tokens, seed=job.eval.seed
    )

    def generate(model_inputs: list[str], *, temperature: float | None = None,
                 seed: int | None = None) -> list[str]:  # fmt: skip
        if temperature is None and seed is None:
            outputs = llm.generate(list(model_inputs), sampling)
        else:  # one seed per request: equal prompts in one call must draw different samples
            base = job.eval.seed if seed is None else seed
            outputs = llm.generate(list(model_inputs), [vllm.SamplingParams(
                temperature=job.eval.temperature if temperature is None else temperature,
                max_tokens=job.eval.max_new_tokens, seed=base + i)
                for i in range(len(model_inputs))])  # fmt: skip
        return [o.outputs[0].text for o in outputs]

    return generate
