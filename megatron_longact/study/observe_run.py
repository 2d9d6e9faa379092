"""``longact observe``: the paper's saliency observations on an HF model (Figures 1, 3-5).

Measures M (Eq. 2) on key-value retrieval prompts and writes, under ``--out``:

- ``saliency.safetensors`` (longact's format; ``tools/plot_saliency.py`` draws the heatmaps),
- ``stats.md`` / ``stats.json``: per layer, for Q, K, V, max/median per head and the share of
  sum M and sum M^2 in the top-λ dims of each head,
- the stability of the ``massive`` selection (Jaccard, with the random-draw baseline): between
  two disjoint halves of the prompts, between short and long prompts, and between this model
  and ``--compare-model`` (e.g. the same model after a short SFT) on the same prompts,
- ``observations.png``: those numbers per layer.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from megatron_longact.errors import UserError
from megatron_longact.longact.profile import SaliencyProfile, save_saliency
from megatron_longact.study import probe_tasks
from megatron_longact.study.hf_model import (
    PROJECTIONS,
    chat_ids,
    load_hf,
    per_sample_saliency,
    profile_from_samples,
)
from megatron_longact.study.observations import outlier_stats, profile_jaccard, random_jaccard


@dataclass(kw_only=True)
class ObserveConfig:
    """Settings of ``longact observe`` (defaults fit 2 CPU cores for SmolLM2-135M)."""

    model_dir: str
    """Local HF folder."""
    out_dir: str
    """Output folder."""
    compare_model_dir: str | None = None
    """A second HF folder of the same shape (e.g. after SFT), measured on the same prompts."""
    ratio: float = 0.3
    """λ of the top-λ statistics and of the selections compared."""
    num_prompts: int = 6
    """Prompts of the main set (split in two disjoint halves for the batch Jaccard)."""
    context_tokens: int = 1024
    """Document length of the main set."""
    short_tokens: int = 256
    """Document length of the short set."""
    long_tokens: int = 2048
    """Document length of the long set."""
    num_short: int = 6
    num_long: int = 3
    num_facts: int = 4
    seed: int = 0


def _profile(model, shape, tokenizer, *, tokens: int, count: int, config, seed_offset: int):
    probes = probe_tasks.retrieval_probes(tokenizer, num_samples=count, context_tokens=tokens,
                                          num_facts=config.num_facts,
                                          seed=config.seed + seed_offset)  # fmt: skip
    ids = [chat_ids(tokenizer, p.message) for p in probes]
    print(f"observe: {count} prompts of ~{len(ids[0])} tokens", flush=True)
    return per_sample_saliency(model, ids), ids


def _jaccards(a: SaliencyProfile, b: SaliencyProfile, ratio: float) -> dict[str, list[float]]:
    return {p: profile_jaccard(a, b, ratio=ratio, projection=p) for p in PROJECTIONS}


def run_observe(config: ObserveConfig) -> dict:
    """Measures and writes everything (see the module docstring); returns the JSON payload."""
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, shape = load_hf(config.model_dir)
    main, main_ids = _profile(model, shape, tokenizer, tokens=config.context_tokens,
                              count=config.num_prompts, config=config, seed_offset=0)  # fmt: skip
    half = config.num_prompts // 2
    full = profile_from_samples(main, shape)
    save_saliency(out / "saliency.safetensors", full)
    stats = {
        layer: {p: asdict(outlier_stats(full.saliency[layer][p], ratio=config.ratio))
                for p in PROJECTIONS}
        for layer in sorted(full.saliency)
    }  # fmt: skip
    stability = {
        "disjoint_batches": _jaccards(
            profile_from_samples(main, shape, rows=slice(0, half)),
            profile_from_samples(main, shape, rows=slice(half, None)),
            config.ratio,
        )
    }
    short, _ = _profile(model, shape, tokenizer, tokens=config.short_tokens,
                        count=config.num_short, config=config, seed_offset=1)  # fmt: skip
    long, _ = _profile(model, shape, tokenizer, tokens=config.long_tokens,
                       count=config.num_long, config=config, seed_offset=2)  # fmt: skip
    stability["short_vs_long"] = _jaccards(
        profile_from_samples(short, shape), profile_from_samples(long, shape), config.ratio
    )
    if config.compare_model_dir:
        other, _, other_shape = load_hf(config.compare_model_dir)
        if other_shape != shape:
            raise UserError(f"--compare-model {config.compare_model_dir}: shape {other_shape} "
                             f"differs from {shape}")  # fmt: skip
        print("observe: the compare model on the main prompts", flush=True)
        compared = profile_from_samples(per_sample_saliency(other, main_ids), shape)
        save_saliency(out / "saliency_compare.safetensors", compared)
        stability["base_vs_compare"] = _jaccards(full, compared, config.ratio)
    baseline = random_jaccard(ratio=config.ratio, head_dim=shape.head_dim)
    payload = {"config": asdict(config), "random_jaccard": baseline, "stats": stats,
               "stability": stability}  # fmt: skip
    (out / "stats.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / "stats.md").write_text(format_markdown(payload))
    plot_observations(payload, out / "observations.png")
    return payload


def format_markdown(payload: dict) -> str:
    ratio = payload["config"]["ratio"]
    stats = payload["stats"]
    lines = [
        f"Per layer (λ = {ratio}): max/median of M per head (mean over heads), and the share of "
        f"ΣM and ΣM² in each head's top-λ dims (a flat M gives {ratio:.2f} for both).",
        "",
        "| layer | Q max/med | Q ΣM | Q ΣM² | K max/med | K ΣM | K ΣM² | V max/med | V ΣM | V ΣM² |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for layer, per in stats.items():
        cells = [f"{per[p]['max_over_median']:.1f} | {per[p]['share_sum']:.2f} | "
                 f"{per[p]['share_sum_sq']:.2f}" for p in PROJECTIONS]  # fmt: skip
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    mean = {p: {k: statistics.fmean(per[p][k] for per in stats.values())
                for k in ("max_over_median", "share_sum", "share_sum_sq")}
            for p in PROJECTIONS}  # fmt: skip
    cells = [f"{mean[p]['max_over_median']:.1f} | {mean[p]['share_sum']:.2f} | "
             f"{mean[p]['share_sum_sq']:.2f}" for p in PROJECTIONS]  # fmt: skip
    lines.append("| **mean** | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Jaccard of the top-λ selections, mean over layers [min, max] (two independent random "
        f"draws: {payload['random_jaccard']:.3f}):",
        "",
        "| comparison | Q | K | V |",
        "|---|---|---|---|",
    ]
    for name, per in payload["stability"].items():
        cells = [f"{statistics.fmean(per[p]):.3f} [{min(per[p]):.2f}, {max(per[p]):.2f}]"
                 for p in PROJECTIONS]  # fmt: skip
        lines.append(f"| {name.replace('_', ' ')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_observations(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = payload["stats"]
    layers = [int(n) for n in stats]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for p in PROJECTIONS:
        axes[0].plot(layers, [stats[n][p]["share_sum_sq"] for n in stats], label=f"{p.upper()} ΣM²")
        axes[0].plot(layers, [stats[n][p]["share_sum"] for n in stats], "--",
                     label=f"{p.upper()} ΣM")  # fmt: skip
        axes[1].plot(layers, [stats[n][p]["max_over_median"] for n in stats], label=p.upper())
    axes[0].axhline(payload["config"]["ratio"], color="gray", linestyle=":", label="flat M")
    axes[0].set_title(f"share in top-{payload['config']['ratio']} dims per head")
    axes[1].set_title("max / median of M per head (mean over heads)")
    axes[1].set_yscale("log")
    for name, per in payload["stability"].items():
        axes[2].plot(layers, per["q"], label=f"Q {name.replace('_', ' ')}")
    axes[2].axhline(payload["random_jaccard"], color="gray", linestyle=":", label="random")
    axes[2].set_title("Jaccard of the Q selections")
    axes[2].set_ylim(0, 1.05)
    for ax in axes:
        ax.set_xlabel("layer")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """``longact observe --model DIR --out DIR [--compare-model DIR]``."""
    parser = argparse.ArgumentParser(prog="longact observe",
                                     description="saliency statistics and stability (Fig. 1)")  # fmt: skip
    defaults = ObserveConfig(model_dir="", out_dir="")
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--compare-model", default=None)
    for name in ("ratio", "num_prompts", "context_tokens", "short_tokens", "long_tokens",
                 "num_short", "num_long", "num_facts", "seed"):  # fmt: skip
        value = getattr(defaults, name)
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    values = {k: v for k, v in vars(args).items() if k not in ("model", "out", "compare_model")}
    if values["num_prompts"] < 2:
        raise UserError("--num-prompts must be at least 2 (two disjoint halves)")
    run_observe(ObserveConfig(model_dir=args.model, out_dir=args.out,
                              compare_model_dir=args.compare_model, **values))  # fmt: skip
    print(f"wrote {Path(args.out) / 'stats.md'}")
    return 0
