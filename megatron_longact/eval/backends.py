"""Text generation backends for the evaluation runner: ``prompts -> responses``.

``native`` decodes with the megatron model itself (``rl.rollout.native``), loading
``checkpoint.load_dir``; ``vllm`` loads an exported Hugging Face folder. Both wrap each prompt
as one user turn of the tokenizer's chat template. The runtime is imported lazily: the suites
and scorers never depend on megatron.
"""

from __future__ import annotations

from megatron_longact.config.schema import JobConfig
from megatron_longact.data.chat_template import render_user_prompt, resolve_chat_template
from megatron_longact.eval.runner import GenerateFn


def chat_prompt(tokenizer, text: str) -> str:
    """``text`` as a user turn with the generation prompt, under the template SFT and RL use
    (``data.chat_template``); raw text when the tokenizer has no template and no ChatML tokens."""
    if resolve_chat_template(tokenizer) is None:
        return text
    return render_user_prompt(tokenizer, text)


def native_backend(job: JobConfig, tokenizer) -> GenerateFn:
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
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    engine = NativeEngine(model, pad_token_id=pad, batch_size=job.eval.batch_size)
    params = SamplingParams(
        temperature=job.eval.temperature,
        max_new_tokens=job.eval.max_new_tokens,
        stop_token_ids=stop_token_ids(tokenizer, []),
        seed=job.eval.seed,
    )
    stops = set(params.stop_token_ids)

    def generate(prompts: list[str]) -> list[str]:
        ids = [tokenizer.encode(chat_prompt(tokenizer, p), add_special_tokens=False)
               for p in prompts]  # fmt: skip
        outputs = engine.generate(ids, params)
        return [
            tokenizer.decode(
                [t for t in out.response_ids if t not in stops], skip_special_tokens=False
            )  # fmt: skip
            for out in outputs
        ]

    return generate


def vllm_backend(job: JobConfig, tokenizer) -> GenerateFn:
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

    def generate(prompts: list[str]) -> list[str]:
        outputs = llm.generate([chat_prompt(tokenizer, p) for p in prompts], sampling)
        return [o.outputs[0].text for o in outputs]

    return generate
