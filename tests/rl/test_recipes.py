"""The example recipes: all load, carry the paper's values, and each ablation differs from its
base recipe in exactly the keys it is about (the loader has no inheritance, so every recipe is
a complete file and this test keeps the copies in step)."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_longact.config import JobConfig, load_config
from megatron_longact.config.loader import to_dict

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
RL_BASE_8B = "dapo_longact-qwen3_8b.yaml"
OUTPUT_KEYS = {"checkpoint.save_dir", "logging.tensorboard_dir"}
"""Every run writes its own folders; the ablation tests allow (and require) these to differ."""

# Ablation recipe -> the keys and values it changes in dapo_longact-qwen3_8b.yaml.
ABLATIONS = {
    "dapo-qwen3_8b.yaml": {"longact.strategy": "none"},
    "grpo_longact-qwen3_8b.yaml": {
        "rl.algorithm": "grpo",
        "rl.kl_beta": 0.01,
        "rl.eps_high": 0.2,
        "rl.dynamic_sampling": False,
    },
    "clip_cov_longact-qwen3_8b.yaml": {
        "rl.algorithm": "clip_cov",
        "rl.eps_low": 1.0,
        "rl.eps_high": 1.0,
    },
    "kl_cov_longact-qwen3_8b.yaml": {"rl.algorithm": "kl_cov"},
    "dapo_longact-qwen3_8b-min.yaml": {"longact.strategy": "min"},
    "dapo_longact-qwen3_8b-random.yaml": {"longact.strategy": "random"},
    "dapo_longact-qwen3_8b-lambda0.2.yaml": {"longact.ratio": 0.2},
    "dapo_longact-qwen3_8b-lambda0.4.yaml": {"longact.ratio": 0.4},
}
# Per-model recipe -> its model-size independent base (the one the Slurm jobs use).
PER_MODEL = {
    "sft-qwen3_8b.yaml": "longact_sft.yaml",
    "sft-qwen3_4b.yaml": "longact_sft.yaml",
    "dapo_longact-qwen3_8b.yaml": "longact_rl.yaml",
    "dapo_longact-qwen3_4b.yaml": "longact_rl.yaml",
}
# What a per-model recipe may add to its base: the model, the layout and the folders.
PER_MODEL_SECTIONS = ("model.", "parallel.", "checkpoint.", "logging.")
PER_MODEL_KEYS = {"data.tokenizer_path", "train.recompute"}

SFT_RECIPES = ["longact_sft.yaml", "sft-qwen3_8b.yaml", "sft-qwen3_4b.yaml"]
RL_RECIPES = ["longact_rl.yaml", RL_BASE_8B, "dapo_longact-qwen3_4b.yaml", *ABLATIONS]
QUICKSTARTS = ["quickstart_cpu.yaml", "quickstart_rl_cpu.yaml"]


def _flat(name: str) -> dict:
    """The loaded recipe (schema defaults filled in) as {dotted key: value}."""
    config = load_config(JobConfig, EXAMPLES / name)
    flat = {}
    for section, values in to_dict(config).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value
    return flat


def _diff(base: str, other: str) -> dict:
    a, b = _flat(base), _flat(other)
    return {key: b[key] for key in a if a[key] != b[key]}


def test_every_recipe_is_known_loads_and_is_documented():
    names = sorted(p.name for p in EXAMPLES.glob("*.yaml"))
    assert names == sorted(set(SFT_RECIPES + RL_RECIPES + QUICKSTARTS))
    readme = (EXAMPLES / "README.md").read_text()
    for name in names:
        load_config(JobConfig, EXAMPLES / name)  # raises on any unknown key or bad value
        assert name in readme, f"{name} is not described in examples/README.md"


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_ablation_differs_from_base_only_in_its_keys(name):
    diff = _diff(RL_BASE_8B, name)
    assert set(OUTPUT_KEYS) <= set(diff), "an ablation must not write into the base run's folders"
    assert {k: v for k, v in diff.items() if k not in OUTPUT_KEYS} == ABLATIONS[name]


@pytest.mark.parametrize("name", list(PER_MODEL))
def test_per_model_recipe_is_its_base_plus_model_layout_and_folders(name):
    diff = _diff(PER_MODEL[name], name)
    unexpected = [
        k for k in diff if not k.startswith(PER_MODEL_SECTIONS) and k not in PER_MODEL_KEYS
    ]
    assert not unexpected, f"{name} differs from {PER_MODEL[name]} in {unexpected}"
    flat = _flat(name)
    assert flat["model.hf_path"] and flat["data.tokenizer_path"] == flat["model.hf_path"]
    if name.startswith("dapo"):  # RL starts from the SFT recipe's checkpoints
        sft = _flat(name.replace("dapo_longact-", "sft-"))
        assert flat["checkpoint.load_dir"] == sft["checkpoint.save_dir"]


@pytest.mark.parametrize("name", SFT_RECIPES)
def test_sft_recipes_use_the_paper_values(name):
    cfg = load_config(JobConfig, EXAMPLES / name)
    # Section 4.1: cosine, peak 2e-5, warmup ratio 0.03, 16K packed sequences, 900 steps.
    assert (cfg.optim.lr, cfg.optim.lr_decay_style, cfg.optim.warmup_ratio) == (
        2e-5,
        "cosine",
        0.03,
    )
    assert cfg.optim.warmup_steps is None  # the ratio applies
    assert (cfg.data.seq_length, cfg.data.packing, cfg.train.train_steps) == (16384, True, 900)
    assert cfg.train.precision == "auto" and cfg.parallel.use_distributed_optimizer


@pytest.mark.parametrize("name", RL_RECIPES)
def test_rl_recipes_use_the_paper_values(name):
    cfg = load_config(JobConfig, EXAMPLES / name)
    rl = cfg.rl
    # Section 4.1: lr 1e-6, 32K sequences, batch 8 x 16 rollouts, T = 1.0, 4096 new tokens.
    assert cfg.optim.lr == 1e-6
    assert (rl.max_seq_length, rl.prompts_per_step, rl.rollouts_per_prompt) == (32768, 8, 16)
    assert (rl.temperature, rl.top_p, rl.max_new_tokens) == (1.0, 1.0, 4096)
    assert (cfg.optim.weight_decay, cfg.optim.clip_grad) == (0.1, 1.0)
    assert cfg.train.precision == "auto" and cfg.parallel.use_distributed_optimizer
    # DocQA-RL-1.6K mixed with 1K MemAgent samples.
    assert [(d.format, d.ratio) for d in rl.datasets] == [("docqa", 1600), ("memagent", 1000)]
    assert rl.num_samples == 2600
    expected_ratio = ABLATIONS.get(name, {}).get("longact.ratio", 0.3)  # lambda (Table 6)
    assert cfg.longact.ratio == expected_ratio
    expected = ABLATIONS.get(name, {})
    assert rl.algorithm == expected.get("rl.algorithm", "dapo")
    assert cfg.longact.strategy == expected.get("longact.strategy", "massive")
    if rl.algorithm == "dapo":
        assert (rl.eps_low, rl.eps_high, rl.dynamic_sampling, rl.kl_beta) == (0.2, 0.28, True, 0)
