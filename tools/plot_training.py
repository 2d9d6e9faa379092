"""Plot training curves from ``metrics.jsonl`` files (written next to the TensorBoard logs).

    python tools/plot_training.py --sft runs/quickstart/sft/tensorboard/metrics.jsonl \
        --rl runs/quickstart/rl/tensorboard/metrics.jsonl --out runs/quickstart/curves.png

Panels: SFT train/val loss; RL reward mean (with format rate, accuracy and, when the run logged
it, the held-out mean@k accuracy with its standard error); RL response length
and entropy; LongAct's trainable Q/K row fraction and mask overlap (Jaccard) between steps.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(path: Path) -> list[dict]:
    """Records of a metrics.jsonl, one per step: a step's lines are merged (the RL loop logs its
    held-out evaluation as a line of its own), later values win (a resumed run's repeats)."""
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step.setdefault(record["step"], {}).update(record)
    return [by_step[s] for s in sorted(by_step)]


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if key in r]
    return [p[0] for p in points], [p[1] for p in points]


def _mean_matching(records: list[dict], needle: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for r in records:
        found = [v for k, v in r.items() if needle in k]
        if found:
            steps.append(r["step"])
            values.append(sum(found) / len(found))
    return steps, values


def plot(sft: Path | None, rl: Path | None, out: Path) -> Path:
    """Writes the PNG and returns its path."""
    panels = []
    if sft is not None:
        panels.append("sft")
    if rl is not None:
        panels += ["reward", "length", "longact"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    axes = dict(zip(panels, axes[0]))
    if sft is not None:
        records, ax = read_metrics(sft), axes["sft"]
        ax.plot(*_series(records, "train/loss"), label="train")
        ax.plot(*_series(records, "val/loss"), "o-", label="validation")
        ax.set(title="SFT cold start", xlabel="step", ylabel="loss (assistant tokens)")
        ax.legend()
    if rl is not None:
        records = read_metrics(rl)
        ax = axes["reward"]
        ax.plot(*_series(records, "rollout/reward_mean"), label="reward (format + answer)")
        ax.plot(*_series(records, "rollout/format_rate"), "--", label="format rate")
        ax.plot(*_series(records, "rollout/accuracy"), ":", label="accuracy")
        # The held-out evaluation (rl.eval_interval): mean@k, SE bars, beside the reward.
        steps, held = _series(records, "heldout/accuracy")
        if steps:
            errors = [r["heldout/accuracy_se"] for r in records if "heldout/accuracy" in r]
            ax.errorbar(steps, held, yerr=errors, fmt="o-", capsize=3,
                        label="held-out accuracy (mean@k ± SE)")  # fmt: skip
        ax.set(title="RL: DAPO + LongAct", xlabel="step", ylim=(-0.05, 2.05))
        ax.legend(fontsize=8)
        ax = axes["length"]
        ax.plot(*_series(records, "rollout/response_len_mean"), label="response length")
        ax.set(title="RL rollouts", xlabel="step", ylabel="tokens")
        twin = ax.twinx()
        twin.plot(*_series(records, "train/entropy"), color="tab:red", label="entropy")
        twin.set_ylabel("entropy (nats)", color="tab:red")
        ax = axes["longact"]
        ax.plot(*_mean_matching(records, "trainable"), label="trainable Q/K rows")
        ax.plot(*_mean_matching(records, "jaccard"), "--", label="mask overlap (Jaccard)")
        ax.set(title="LongAct masks (mean over layers)", xlabel="step", ylim=(0, 1.05))
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft", type=Path, help="SFT metrics.jsonl")
    parser.add_argument("--rl", type=Path, help="RL metrics.jsonl")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = parser.parse_args(argv)
    if args.sft is None and args.rl is None:
        parser.error("give --sft and/or --rl")
    print(f"wrote {plot(args.sft, args.rl, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
