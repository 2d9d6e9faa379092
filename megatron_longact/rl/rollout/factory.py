"""Choose the rollout engine and the sampling parameters of a run."""

from __future__ import annotations

from megatron_longact.config.schema import JobConfig
from megatron_longact.rl.rollout.types import SamplingParams


def stop_token_ids(tokenizer, stop_strings: list[str]) -> tuple[int, ...]:
    """EOS/end-of-turn ids plus the single-token ids of ``stop_strings`` (e.g. ``</answer>``).

    Raises ValueError naming a stop string that is not one token (the native engine stops on
    token ids).
    """
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for token in ("<|im_end|>", "<|endoftext|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    for text in stop_strings:
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) != 1:
            raise ValueError(
                f"rl.stop_strings: {text!r} is {len(encoded)} tokens for this tokenizer; the "
                "native engine stops on single tokens"
            )
        ids.add(encoded[0])
    return tuple(sorted(ids))


def sampling_params(job: JobConfig, tokenizer, round_index: int, *, step: int) -> SamplingParams:
    """Sampling for generation round ``round_index`` of RL step ``step``.

    The seed depends on (rl.seed, step, round, DP rank): replicas sample differently, while
    the TP ranks of one replica draw identical tokens.
    """
    from megatron.core import parallel_state

    rl = job.rl
    seed = (rl.seed * 1_000_003 + step * 1009 + round_index) * 97 + (
        parallel_state.get_data_parallel_rank()
    )
    return SamplingParams(
        temperature=rl.temperature,
        top_p=rl.top_p,
        max_new_tokens=rl.max_new_tokens,
        stop_token_ids=stop_token_ids(tokenizer, rl.stop_strings),
        seed=seed,
    )


def build_engine(job: JobConfig, state, tokenizer):
    """``rl.engine``: ``native`` (the megatron policy itself) or ``vllm`` (colocated)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if job.rl.engine == "native":
        from megatron_longact.rl.rollout.native import NativeEngine

        return NativeEngine(
            state.model[0], pad_token_id=pad, batch_size=job.rl.generation_batch_size
        )
    from megatron_longact.rl.rollout.vllm_engine import VLLMEngine

    return VLLMEngine.from_train_state(job, state, tokenizer)
