"""The saliency file format and the heatmap tool (no processes)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from megatron_longact.longact.profile import SaliencyProfile, load_saliency, save_saliency

TOOL = Path(__file__).resolve().parents[2] / "tools" / "plot_saliency.py"


def _profile() -> SaliencyProfile:
    gen = torch.Generator().manual_seed(0)
    saliency = {
        n: {
            "q": torch.rand(12, 80, generator=gen),
            "k": torch.rand(2, 80, generator=gen),
            "v": torch.rand(2, 80, generator=gen),
        }
        for n in (0, 1, 2, 3, 4, 5)
    }
    return SaliencyProfile(
        saliency=saliency, num_samples=7, num_heads=12, num_groups=2, head_dim=80
    )


def test_save_load_round_trip(tmp_path):
    profile = _profile()
    save_saliency(tmp_path / "m.safetensors", profile)
    loaded = load_saliency(tmp_path / "m.safetensors")
    assert (loaded.num_samples, loaded.num_heads, loaded.num_groups, loaded.head_dim) == (
        7,
        12,
        2,
        80,
    )
    assert sorted(loaded.saliency) == list(range(6))
    for n, per in profile.saliency.items():
        for p, values in per.items():
            assert torch.equal(loaded.saliency[n][p], values)
    with pytest.raises(FileNotFoundError, match="longact saliency"):
        load_saliency(tmp_path / "missing.safetensors")


def test_plot_panels_show_the_first_heads_and_dims(tmp_path):
    spec = importlib.util.spec_from_file_location("plot_saliency", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    profile = _profile()
    assert tool.default_layers(list(range(6))) == [0, 2, 4, 5]
    fig = tool.plot_saliency(profile, layers=[1, 4], projections=["q", "k"], ratio=0.3)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 4
    shown = panels[0].images[0].get_array()
    assert shown.shape == (8, 64)  # first 8 heads x 64 dims
    assert torch.equal(torch.as_tensor(shown.data), profile.saliency[1]["q"][:8, :64])
    marks = panels[0].collections[0].get_offsets()
    assert len(marks) == 8 * 24 - sum(  # top floor(0.3 * 80) = 24 per head, minus off-panel dims
        int((torch.topk(profile.saliency[1]["q"][h], 24).indices >= 64).sum()) for h in range(8)
    )
    save_saliency(tmp_path / "m.safetensors", profile)
    tool.main([str(tmp_path / "m.safetensors"), "-o", str(tmp_path / "m.png")])
    assert (tmp_path / "m.png").stat().st_size > 10_000
