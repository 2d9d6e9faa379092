"""Choose the rollout engine and the sampling parameters of a run."""

from __future__ import annotations

from megatron_longact.config.schema import JobConfig
from megatron_longact.data.tokenizer import pad_id
from megatron_longact.rl.rollout.stops import resolve_stop_conditions
from megatron_longact.rl.rollout.types import SamplingParams


def stop_token_ids(tokenizer, stop_strings: list[str]) -> tuple[int, ...]:
    """EOS/end-of-turn ids plus the single-token ids of ``stop_strings`` (multi-token strings
    are in :func:`stops.resolve_stop_conditions`'s ``sequences`` and ``strings``)."""
    return resolve_stop_conditions(tokenizer, stop_strings).token_ids


def replica_rank() -> tuple[int, int]:
    """(rank, size) of this rank's generation replica among all of them: DP x CP.

    Under CP each CP rank generates its own share of the replica's rollouts, so replicas are
    the ranks of the DP x CP group (TP ranks of one replica decode in lockstep). At CP = 1 this
    is the DP rank.
    """
    from megatron.core import parallel_state

    return (
        parallel_state.get_data_parallel_rank(with_context_parallel=True),
        parallel_state.get_data_parallel_world_size(with_context_parallel=True),
    )


def sampling_params(job: JobConfig, tokenizer, round_index: int, *, step: int) -> SamplingParams:
    """Sampling for generation round ``round_index`` of RL step ``step``.

    The seed depends on (rl.seed, step, round, replica rank over DP x CP): replicas sample
    differently, while the TP ranks of one replica draw identical tokens.
    """
    rl = job.rl
    rank, _ = replica_rank()
    seed = (rl.seed * 1_000_003 + step * 1009 + round_index) * 97 + rank
    stops = resolve_stop_conditions(tokenizer, rl.stop_strings)
    return SamplingParams(
        temperature=rl.temperature,
        top_p=rl.top_p,
        max_new_tokens=rl.max_new_tokens,
        stop_token_ids=stops.token_ids,
        stop_strings=stops.strings,
        stop_sequences=stops.sequences,
        seed=seed,
    )


def build_engine(job: JobConfig, state, tokenizer):
    """``rl.engine``: ``native`` (the megatron policy itself) or ``vllm`` (colocated)."""
    pad = pad_id(tokenizer)
    if job.rl.engine == "native":
        from megatron_longact.rl.rollout.native import NativeEngine

        return NativeEngine(state.model[0], pad_token_id=pad,
                            batch_size=job.rl.generation_batch_size, tokenizer=tokenizer)  # fmt: skip
    from megatron_longact.rl.rollout.vllm_engine import VLLMEngine

    return VLLMEngine.from_train_state(job, state, tokenizer)
