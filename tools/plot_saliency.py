"""Heatmaps of LongAct saliency M (heads x dims), in the style of the paper's Figures 1, 3-5.

Reads a file written by ``longact.profile`` (``longact saliency``) and draws one panel per
(layer, projection): query/KV heads down, head dims across, colour = M[h, d] (Eq. 2). With
``--ratio`` the dims that ``massive`` selection would train (top floor(ratio * D) per head) are
marked with dots.

    python tools/plot_saliency.py runs/saliency.safetensors -o runs/saliency.png
    python tools/plot_saliency.py s.safetensors --layers 0,13,27 --projections q,k,v --ratio 0.3
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from megatron_longact.longact.profile import SaliencyProfile, load_saliency  # noqa: E402
from megatron_longact.longact.selection import select_dims  # noqa: E402

DEFAULT_MAX_HEADS = 8
DEFAULT_MAX_DIMS = 64
TITLES = {"q": "Query", "k": "Key", "v": "Value"}


def default_layers(layers: list[int]) -> list[int]:
    """All layers when there are at most 4, else first, two interior and last."""
    if len(layers) <= 4:
        return layers
    picks = {0, len(layers) // 3, 2 * len(layers) // 3, len(layers) - 1}
    return [layers[i] for i in sorted(picks)]


def plot_saliency(
    profile: SaliencyProfile,
    *,
    layers: list[int],
    projections: list[str],
    max_heads: int = DEFAULT_MAX_HEADS,
    max_dims: int = DEFAULT_MAX_DIMS,
    ratio: float | None = None,
):
    """A matplotlib Figure: rows = layers, columns = projections, panels [heads, dims]."""
    fig, axes = plt.subplots(
        len(layers),
        len(projections),
        squeeze=False,
        figsize=(4.2 * len(projections), 2.4 * len(layers) + 0.6),
    )
    for row, layer in enumerate(layers):
        if layer not in profile.saliency:
            raise ValueError(f"layer {layer} is not in the file (has {sorted(profile.saliency)})")
        for col, projection in enumerate(projections):
            full = profile.saliency[layer][projection].float()
            values = full[:max_heads, :max_dims]
            ax = axes[row][col]
            image = ax.imshow(
                values.numpy(), aspect="auto", cmap="viridis", interpolation="nearest"
            )
            if ratio is not None:
                selected = select_dims(full, ratio=ratio)[:max_heads, :max_dims]
                heads, dims = selected.nonzero(as_tuple=True)
                ax.scatter(
                    dims.numpy(),
                    heads.numpy(),
                    s=6,
                    c="red",
                    marker="o",
                    label=f"top {ratio:g} per head",
                )
            ax.set_title(
                f"layer {layer} {TITLES[projection]} "
                f"({values.shape[0]}/{full.shape[0]} heads, "
                f"{values.shape[1]}/{full.shape[1]} dims)",
                fontsize=9,
            )
            ax.set_xlabel("head dim d", fontsize=8)
            ax.set_ylabel("head h", fontsize=8)
            ax.set_yticks(range(values.shape[0]))
            ax.tick_params(labelsize=7)
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=7)
    fig.suptitle(
        f"LongAct saliency M (mean over {profile.num_samples} samples of the per-"
        "sample l2 norm over tokens)",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="saliency .safetensors from longact.profile")
    parser.add_argument("-o", "--out", default=None, help="PNG path (default: next to the file)")
    parser.add_argument("--layers", default=None, help="comma-separated layer indices")
    parser.add_argument("--projections", default="q,k", help="subset of q,k,v")
    parser.add_argument("--max-heads", type=int, default=DEFAULT_MAX_HEADS)
    parser.add_argument("--max-dims", type=int, default=DEFAULT_MAX_DIMS)
    parser.add_argument(
        "--ratio",
        type=float,
        default=None,
        help="mark the dims massive selection keeps at this lambda",
    )
    parser.add_argument("--dpi", type=int, default=150)
    args = parser.parse_args(argv)

    profile = load_saliency(args.path)
    layers = (
        [int(x) for x in args.layers.split(",")]
        if args.layers
        else default_layers(list(profile.saliency))
    )
    projections = [p.strip() for p in args.projections.split(",")]
    bad = [p for p in projections if p not in TITLES]
    if bad:
        parser.error(f"--projections must be a subset of q,k,v; got {bad}")
    fig = plot_saliency(
        profile,
        layers=layers,
        projections=projections,
        max_heads=args.max_heads,
        max_dims=args.max_dims,
        ratio=args.ratio,
    )
    out = Path(args.out) if args.out else Path(args.path).with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=args.dpi)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
