"""The RL prompt set of a run: sources loaded and mixed by ratio."""

from __future__ import annotations

from megatron_longact.config.schema import DataConfig, RLConfig
from megatron_longact.data.rl_data import (
    RLRecord,
    load_docqa_rl,
    load_memagent_rl,
    load_rl_jsonl,
    mix_datasets,
)
from megatron_longact.errors import UserError

_LOADERS = {"jsonl": load_rl_jsonl, "docqa": load_docqa_rl, "memagent": load_memagent_rl}


def load_rl_records(rl: RLConfig, data: DataConfig) -> list[RLRecord]:
    """All training prompts, mixed by ``rl.datasets[*].ratio`` (deterministic by ``rl.seed``)."""
    if rl.datasets and data.train_path is not None:
        raise UserError(
            f"both rl.datasets and data.train_path={data.train_path} are set; the RL prompts "
            "come from one of them: drop data.train_path or list it under rl.datasets"
        )
    if not rl.datasets:
        if data.train_path is None:
            raise UserError(
                "set rl.datasets or data.train_path to an RL data file (JSONL, parquet or an HF folder)"
            )
        return load_rl_jsonl(data.train_path)
    sources = {f"{i}:{d.path}": _LOADERS[d.format](d.path) for i, d in enumerate(rl.datasets)}
    ratios = {name: d.ratio for name, d in zip(sources, rl.datasets)}
    total = rl.num_samples or sum(len(v) for v in sources.values())
    return mix_datasets(sources, ratios, num_samples=total, seed=rl.seed)
