"""Choose the rollout engine and the sampling parameters of a run."""

from __future__ import annotations

import logging

import numpy as np

from megatron_longact.config.schema import JobConfig
from megatron_longact.data.tokenizer import pad_id
from megatron_longact.rl.rollout.stops import resolve_stop_conditions
from megatron_longact.rl.rollout.types import SamplingParams

logger = logging.getLogger(__name__)


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


def hashed_seed(*entropy: int) -> int:
    """A 63-bit seed hashed from non-negative ints by ``numpy.random.SeedSequence``: distinct
    tuples give unrelated seeds, however large any coordinate grows (a linear formula such as
    ``(a * 1009 + b) * 97 + c`` collides once ``c`` reaches its stride)."""
    words = np.random.SeedSequence(list(entropy)).generate_state(2)
    return (int(words[0]) << 31 | int(words[1]) >> 1) & (2**63 - 1)


def rollout_seed(seed: int, *, step: int, round_index: int, replica: int) -> int:
    """The sampling seed of (``rl.seed``, step, generation round, replica rank)."""
    return hashed_seed(seed, step, round_index, replica)


def sampling_params(job: JobConfig, tokenizer, round_index: int, *, step: int) -> SamplingParams:
    """Sampling for generation round ``round_index`` of RL step ``step``.

    The seed depends on (rl.seed, step, round, replica rank over DP x CP) through
    :func:`rollout_seed`: replicas sample differently, while the TP ranks of one replica draw
    identical tokens.
    """
    rl = job.rl
    rank, _ = replica_rank()
    seed = rollout_seed(rl.seed, step=step, round_index=round_index, replica=rank)
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


def resolve_engine(name: str, *, moe: bool = False) -> str:
    """``rl.engine`` as ``native`` or ``vllm``: ``auto`` is vLLM when it imports, else native,
    and native for a mixture-of-experts model on CPU (vLLM's CPU MoE kernel cannot take a
    refit: ``vllm_engine.check_moe_refit``)."""
    if name != "auto":
        return name
    from megatron_longact.device import on_cuda
    from megatron_longact.rl.rollout.vllm_engine import vllm_available

    return "vllm" if vllm_available() and (on_cuda() or not moe) else "native"


def build_engine(job: JobConfig, state, tokenizer):
    """``rl.engine``: ``native`` (the megatron policy itself), ``vllm`` (colocated) or
    ``auto`` (:func:`resolve_engine`; the log says which)."""
    pad = pad_id(tokenizer)
    from megatron_longact.models.gpt import unwrap_gpt

    moe = getattr(unwrap_gpt(state.model[0]).config, "num_moe_experts", None) is not None
    engine = resolve_engine(job.rl.engine, moe=moe)
    logger.info("rollout engine: %s%s", engine, " (rl.engine=auto)" if job.rl.engine == "auto"
                else "")  # fmt: skip
    if engine == "native":
        from megatron_longact.rl.rollout.native import NativeEngine

        return NativeEngine(state.model[0], pad_token_id=pad,
                            batch_size=job.rl.generation_batch_size, tokenizer=tokenizer)  # fmt: skip
    from megatron_longact.rl.rollout.vllm_engine import VLLMEngine

    return VLLMEngine.from_train_state(job, state, tokenizer)
