"""Read the planner's inputs from a run config YAML (``parallel``, ``data``, ``train``, ``rl``,
``model`` sections) plus the same dotted overrides the training CLI takes.

The recipe is read by ``config/loader.py`` into the training's own :class:`JobConfig` (same
overrides, types, defaults and errors as ``longact sft|rl``); what the planner adds is which
sections the recipe writes, from :func:`load_tree`: an ``rl`` section makes it an RL recipe,
and the model is planned only when ``model`` names one. Torch-free, like the rest of the planner.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_longact.config.loader import load_config, load_tree
from megatron_longact.config.schema import JobConfig
from megatron_longact.models.hf_config import ASSETS_DIR

# Named model configs shipped with the package (``model.preset``), e.g. the tiny CPU model.
PACKAGE_MODELS_DIR = ASSETS_DIR


@dataclass(frozen=True, kw_only=True)
class ConfigInputs:
    """Planner inputs found in a config; None where the config does not say.

    ``rollout_sequences`` is ``rl.prompts_per_step * rl.rollouts_per_prompt`` for RL configs;
    ``generation_sequences`` what one generation round decodes (times ``rl.gen_batch_multiplier``
    under dynamic sampling) and ``generation_batch_size`` the native engine's cap per replica
    (None for vLLM, which schedules its own batch).
    """

    tensor_parallel_size: int | None = None
    pipeline_parallel_size: int | None = None
    virtual_pipeline_parallel_size: int | None = None
    context_parallel_size: int | None = None
    expert_parallel_size: int | None = None
    sequence_parallel: bool | None = None
    seq_length: int | None = None
    micro_batch_size: int | None = None
    global_batch_size: int | None = None
    recompute: str | None = None
    model_preset: str | None = None
    hf_config_path: Path | None = None
    rollout_sequences: int | None = None
    generation_sequences: int | None = None
    generation_batch_size: int | None = None
    attention_backend: str | None = None
    rollout_memory_fraction: float | None = None
    """``rl.vllm_memory_fraction`` under ``rl.engine=vllm``: the GPU share vLLM reserves."""
    rollout_sleep: bool | None = None
    """True under ``rl.engine=vllm``: its pool is freed while megatron trains (sleep mode)."""
    logprob_chunk_tokens: int | None = None
    """``rl.logprob_chunk_tokens``: tokens per chunk of the RL log-prob pass (0: unchunked)."""


@dataclass(frozen=True, kw_only=True)
class PlanConfig:
    """A recipe as the planner sees it.

    Attributes:
        job: the recipe as training reads it (``load_config(JobConfig, ...)``).
        written: the sections and keys the YAML and the overrides set (``load_tree``).
    """

    job: JobConfig
    written: dict[str, Any]


def load_plan_config(path: str | Path, overrides: list[str] | None = None) -> PlanConfig:
    """Load a YAML run config with dotted overrides, as ``longact sft|rl`` does."""
    config_path = Path(path)
    if not config_path.is_file():
        raise FileNotFoundError(f"config file {config_path} not found; pass --config PATH.yaml")
    job = load_config(JobConfig, config_path, overrides)
    return PlanConfig(job=job, written=load_tree(config_path, overrides))


def read_plan_inputs(config: PlanConfig) -> ConfigInputs:
    """Pick the planner's inputs out of a loaded config (see :class:`ConfigInputs`).

    For RL configs (an ``rl`` section) the sequence length is ``rl.max_seq_length`` and the
    global batch the rollouts per step (the RL loop does not read ``data.global_batch_size``);
    otherwise ``data.seq_length`` and ``data.global_batch_size`` as the SFT loop reads them.
    """
    job, written = config.job, config.written
    seq_length = job.data.seq_length
    global_batch = job.data.global_batch_size
    rollout_sequences = generation_sequences = generation_batch_size = None
    rollout_memory_fraction = rollout_sleep = logprob_chunk_tokens = None
    if written.get("rl"):
        rl = job.rl
        logprob_chunk_tokens = rl.logprob_chunk_tokens
        seq_length = rl.max_seq_length
        rollout_sequences = global_batch = rl.prompts_per_step * rl.rollouts_per_prompt
        multiplier = rl.gen_batch_multiplier if rl.dynamic_sampling else 1
        generation_sequences = rollout_sequences * multiplier
        if rl.engine == "native":
            generation_batch_size = rl.generation_batch_size
        elif rl.engine == "vllm":
            rollout_memory_fraction, rollout_sleep = rl.vllm_memory_fraction, True

    # model.hf_path wins over model.preset, as in the training CLI; a preset is either one of the
    # planner's Qwen3 presets or a config shipped in the package's assets. An hf_path without a
    # config.json here (a cluster path) leaves the model to --model / --hf-config.
    model = written.get("model") or {}
    hf_config_path = None
    preset = job.model.preset if "preset" in model else None
    if "hf_path" in model and job.model.hf_path:
        candidate = Path(job.model.hf_path)
        candidate = candidate if candidate.suffix == ".json" else candidate / "config.json"
        hf_config_path = candidate if candidate.is_file() else None
    elif preset and (PACKAGE_MODELS_DIR / preset / "config.json").is_file():
        hf_config_path = PACKAGE_MODELS_DIR / preset / "config.json"
    parallel = job.parallel
    return ConfigInputs(
        tensor_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_parallel_size=parallel.num_model_chunks,
        context_parallel_size=parallel.context_parallel_size,
        expert_parallel_size=parallel.expert_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        seq_length=seq_length,
        micro_batch_size=job.data.micro_batch_size,
        global_batch_size=global_batch,
        recompute=job.train.recompute,
        model_preset=preset.lower() if preset else None,
        hf_config_path=hf_config_path,
        rollout_sequences=rollout_sequences,
        generation_sequences=generation_sequences,
        generation_batch_size=generation_batch_size,
        attention_backend=job.model.attention_backend,
        rollout_memory_fraction=rollout_memory_fraction,
        rollout_sleep=rollout_sleep,
        logprob_chunk_tokens=logprob_chunk_tokens,
    )
