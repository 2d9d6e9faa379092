"""The planner's virtual pipeline stages: bubble (PP-1)/(VPP x m), the interleaved schedule's
in-flight activations (Megatron-LM's memory penalty), megatron's layout rules, and the 70B
recipe's layout."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from megatron_longact.plan.layout import Layout, LayoutError, check_layout
from megatron_longact.plan.memory import estimate_memory, in_flight_microbatches
from megatron_longact.plan.model_spec import get_preset

REPO = Path(__file__).resolve().parents[2]
LLAMA_70B = get_preset("llama3.1-70b")


def _layout(*, pp: int = 2, vpp: int = 1, cp: int = 4, global_batch: int = 32) -> Layout:
    return Layout(num_nodes=8, gpus_per_node=8, tensor_parallel_size=8, pipeline_parallel_size=pp,
                  virtual_pipeline_parallel_size=vpp, context_parallel_size=cp,
                  seq_length=16384, global_batch_size=global_batch)  # fmt: skip


@pytest.mark.parametrize("vpp", [1, 2, 5, 10])
def test_bubble_shrinks_by_vpp(vpp):
    report = check_layout(LLAMA_70B, _layout(vpp=vpp))
    assert report.num_microbatches == 32
    assert report.bubble_fraction == pytest.approx((2 - 1) / (vpp * 32))


@pytest.mark.parametrize(("pp", "vpp"), [(2, 2), (2, 5), (4, 5), (8, 10)])
def test_first_stage_holds_megatrons_interleaved_penalty(pp, vpp):
    # Megatron-LM theoretical_memory_usage.py: activations x (1 + (PP-1)/(PP x VPP)) on the
    # first stage, in units of PP micro-batches of the stage's layers.
    layout = _layout(pp=pp, vpp=vpp, cp=1, global_batch=64)
    report = check_layout(LLAMA_70B, layout)
    penalty = 1 + (pp - 1) / (pp * vpp)
    assert in_flight_microbatches(layout, report, stage="first") == pytest.approx(pp * penalty)
    # The last stage waits (VPP-1) x PP chunk-micro-batches before its first backward.
    last = ((vpp - 1) * pp + 1) / vpp
    assert in_flight_microbatches(layout, report, stage="last") == pytest.approx(last)
    # Without virtual stages, 1F1B: min(PP, m) first, one last.
    plain = _layout(pp=pp, cp=1, global_batch=64)
    plain_report = check_layout(LLAMA_70B, plain)
    assert in_flight_microbatches(plain, plain_report, stage="first") == pp
    assert in_flight_microbatches(plain, plain_report, stage="last") == 1


def test_few_microbatches_cap_the_in_flight_chunks():
    # m = 2 micro-batches x VPP 5 chunks: never more than all 10 chunk-micro-batches in flight.
    layout = Layout(num_nodes=1, gpus_per_node=8, tensor_parallel_size=4, pipeline_parallel_size=2,
                    virtual_pipeline_parallel_size=5, seq_length=4096,
                    global_batch_size=2)  # fmt: skip
    report = check_layout(LLAMA_70B, layout)
    assert report.num_microbatches == 2
    assert in_flight_microbatches(layout, report, stage="first") == 2


def test_vpp_costs_first_stage_activations_only_in_proportion():
    plain = estimate_memory(LLAMA_70B, _layout(), recompute="full", enforce_budget=False)
    interleaved = estimate_memory(LLAMA_70B, _layout(vpp=5), recompute="full",
                                  enforce_budget=False)  # fmt: skip
    assert interleaved.weights_gib == plain.weights_gib
    assert plain.activations_gib < interleaved.activations_gib < 2 * plain.activations_gib


@pytest.mark.parametrize(
    ("layout", "match"),
    [
        (dict(pp=1, vpp=2), "needs pipeline_parallel_size >= 2"),
        (dict(pp=2, vpp=3), "not divisible by pipeline_parallel_size x virtual"),  # 80 layers
        (dict(pp=2, vpp=2, global_batch=4), None),  # 4 micro-batches: a multiple of PP 2
    ],
)
def test_layout_rules(layout, match):
    if match is None:
        check_layout(LLAMA_70B, _layout(**layout))
        return
    with pytest.raises(LayoutError, match=match):
        check_layout(LLAMA_70B, _layout(**layout))


def test_odd_microbatch_count_rejected():
    layout = Layout(num_nodes=1, gpus_per_node=8, tensor_parallel_size=4, pipeline_parallel_size=2,
                    virtual_pipeline_parallel_size=2, seq_length=4096,
                    global_batch_size=3)  # fmt: skip
    with pytest.raises(LayoutError, match="multiple of pipeline_parallel_size 2"):
        check_layout(LLAMA_70B, layout)


def test_70b_recipe_uses_virtual_stages_for_sft_within_budget():
    script = (REPO / "launch" / "slurm" / "longact_70b.sh").read_text()
    vpp = int(re.search(r"SFT_VPP=\$\{SFT_VPP:-(\d+)\}", script).group(1))
    assert vpp > 1
    layout = _layout(vpp=vpp)
    estimate = estimate_memory(LLAMA_70B, layout, recompute="full")
    assert estimate.total_gib <= 0.9 * 80  # the README's 10% headroom
    assert math.isclose(check_layout(LLAMA_70B, layout).bubble_fraction, 1 / (vpp * 32))
    common = (REPO / "launch" / "slurm" / "common.sh").read_text()
    assert 'parallel.virtual_pipeline_model_parallel_size="$SFT_VPP"' in common
