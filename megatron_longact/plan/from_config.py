"""Read the planner's inputs from a run config YAML (``parallel``, ``data``, ``train``, ``rl``,
``model`` sections) plus the same dotted overrides the training CLI takes.

Plain dict access on purpose: the planner stays free of the runtime (and of torch), so it reads
only the handful of keys it needs and ignores the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from megatron_longact.config.schema import RLConfig

# Named model configs shipped with the package (``model.preset``), e.g. the tiny CPU model.
PACKAGE_MODELS_DIR = Path(__file__).resolve().parents[1] / "assets" / "models"


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
    context_parallel_size: int | None = None
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


def apply_overrides(config: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides in place (values parsed as YAML scalars)."""
    for item in overrides:
        key, sep, raw_value = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ValueError(
                f"override {item!r} is not of the form section.key=value "
                "(e.g. parallel.context_parallel_size=4)"
            )
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[leaf] = yaml.safe_load(raw_value) if raw_value else ""
    return config


def load_config(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Load a YAML run config and apply dotted overrides."""
    config_path = Path(path)
    if not config_path.is_file():
        raise FileNotFoundError(f"config file {config_path} not found; pass --config PATH.yaml")
    with config_path.open(encoding="utf-8") as handle:
        config = yaml.safe_load(handle) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a mapping of sections at the top level")
    return apply_overrides(config, overrides or [])


def _section(config: dict[str, Any], name: str, source: str) -> dict[str, Any]:
    section = config.get(name) or {}
    if not isinstance(section, dict):
        raise ValueError(f"{source}: section {name!r} must be a mapping")
    return section


def _int(section: dict[str, Any], key: str, where: str) -> int | None:
    value = section.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{where}.{key} must be an integer, got {value!r}")
    return value


def _recompute(value: Any, where: str) -> str | None:
    # Accept the planner's names and booleans (true meaning full recompute).
    if value is None:
        return None
    if isinstance(value, bool):
        return "full" if value else "none"
    if isinstance(value, str) and value.lower() in ("none", "selective", "full"):
        return value.lower()
    raise ValueError(f"{where} must be one of none, selective, full (or a bool), got {value!r}")


def read_plan_inputs(config: dict[str, Any], *, source: str = "config") -> ConfigInputs:
    """Pick the planner's inputs out of a loaded config (see :class:`ConfigInputs`).

    For RL configs (an ``rl`` section) the sequence length is ``rl.max_seq_length`` and the
    global batch defaults to the number of rollouts per step.
    """
    parallel = _section(config, "parallel", source)
    data = _section(config, "data", source)
    train = _section(config, "train", source)
    rl = _section(config, "rl", source)
    model = _section(config, "model", source)

    seq_length = _int(data, "seq_length", f"{source}: data")
    global_batch = _int(data, "global_batch_size", f"{source}: data")
    rollout_sequences = generation_sequences = generation_batch_size = None
    if rl:
        seq_length = _int(rl, "max_seq_length", f"{source}: rl") or seq_length
        prompts = _int(rl, "prompts_per_step", f"{source}: rl")
        rollouts = _int(rl, "rollouts_per_prompt", f"{source}: rl")
        if prompts and rollouts:
            rollout_sequences = prompts * rollouts
            global_batch = global_batch or rollout_sequences
            defaults = RLConfig()
            multiplier = _int(rl, "gen_batch_multiplier", f"{source}: rl")
            dynamic = rl.get("dynamic_sampling", defaults.dynamic_sampling)
            multiplier = (multiplier or defaults.gen_batch_multiplier) if dynamic else 1
            generation_sequences = rollout_sequences * multiplier
            if rl.get("engine", defaults.engine) == "native":
                generation_batch_size = (
                    _int(rl, "generation_batch_size", f"{source}: rl")
                    or defaults.generation_batch_size
                )

    # model.hf_path wins over model.preset, as in the training CLI; a preset is either one of the
    # planner's Qwen3 presets or a config shipped in the package's assets.
    hf_config_path = None
    name = model.get("preset") or model.get("name")
    hf_path = model.get("hf_path")
    if hf_path:
        candidate = Path(str(hf_path))
        candidate = candidate if candidate.suffix == ".json" else candidate / "config.json"
        hf_config_path = candidate if candidate.is_file() else None
    elif name and (PACKAGE_MODELS_DIR / str(name) / "config.json").is_file():
        hf_config_path = PACKAGE_MODELS_DIR / str(name) / "config.json"
    # Absent means the training config's default: off.
    sequence_parallel = bool(parallel.get("sequence_parallel", False))
    return ConfigInputs(
        tensor_parallel_size=_int(parallel, "tensor_model_parallel_size", f"{source}: parallel"),
        pipeline_parallel_size=_int(
            parallel, "pipeline_model_parallel_size", f"{source}: parallel"
        ),
        context_parallel_size=_int(parallel, "context_parallel_size", f"{source}: parallel"),
        sequence_parallel=sequence_parallel,
        seq_length=seq_length,
        micro_batch_size=_int(data, "micro_batch_size", f"{source}: data"),
        global_batch_size=global_batch,
        recompute=_recompute(train.get("recompute"), f"{source}: train.recompute"),
        model_preset=str(name).lower() if name else None,
        hf_config_path=hf_config_path,
        rollout_sequences=rollout_sequences,
        generation_sequences=generation_sequences,
        generation_batch_size=generation_batch_size,
        attention_backend=model.get("attention_backend"),
    )
