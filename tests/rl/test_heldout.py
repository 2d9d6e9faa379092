"""rl/heldout.py without a model: the schedule, the config checks and the sampled metrics."""

from __future__ import annotations

import pytest

from megatron_longact.config import JobConfig, load_config
from megatron_longact.data.rl_data import RLRecord, write_rl_jsonl
from megatron_longact.rl.experience import Sample
from megatron_longact.rl.heldout import HeldOutEval, sampled_metrics
from megatron_longact.rl.loop import interval_callbacks
from megatron_longact.stats import pass_at_k


def _sample(ok: bool) -> Sample:
    return Sample(prompt_ids=[1], response_ids=[2], engine_logprobs=[0.0], reward=1.0 + ok,
                  format_ok=True, answer_ok=ok, truncated=False)  # fmt: skip


def test_sampled_metrics_by_hand():
    groups = [[_sample(True), _sample(True), _sample(False), _sample(False)],
              [_sample(False)] * 4, [_sample(True)] * 4]  # fmt: skip
    m = sampled_metrics(groups, num_samples=4)
    # Per-prompt accuracies 0.5, 0, 1: mean 0.5, sd 0.5, SE 0.5 / sqrt(3).
    assert m["heldout/accuracy"] == pytest.approx(0.5)
    assert m["heldout/accuracy_se"] == pytest.approx(0.5 / 3**0.5)
    assert m["heldout/reward"] == pytest.approx(1.5) and m["heldout/format_rate_se"] == 0.0
    assert m["heldout/pass@4"] == pytest.approx((pass_at_k(4, 2, 4) + 0 + 1) / 3)


def test_schedule_and_config(tmp_path):
    data = tmp_path / "val.jsonl"
    write_rl_jsonl([RLRecord(id=f"r{i}", context="c", question="q", answer="a", choices=None,
                             source="kv") for i in range(5)], data)  # fmt: skip
    assert HeldOutEval.from_job(load_config(JobConfig, None, [])) is None  # off by default
    job = load_config(JobConfig, None, ["rl.eval_interval=10", f"eval.synthetic_kv_path={data}",
                                        "rl.eval_num_prompts=3"])  # fmt: skip
    held_out = HeldOutEval.from_job(job)
    assert [r.id for r in held_out.records] == ["r0", "r1", "r2"]
    every = interval_callbacks(None, held_out)[0]  # the RL loop's schedule for it
    assert [s for s in range(26) if every.due(s, last_step=25)] == [0, 10, 20, 25]
    # longact study evaluates the shared step 0 in one run only.
    late = HeldOutEval.from_job(load_config(JobConfig, None, [
        "rl.eval_interval=10", f"eval.synthetic_kv_path={data}", "rl.eval_at_start=false"]))  # fmt: skip
    every = interval_callbacks(None, late)[0]
    assert [s for s in range(26) if every.due(s, last_step=25)] == [10, 20, 25]
    with pytest.raises(ValueError, match="eval.synthetic_kv_path"):
        HeldOutEval.from_job(load_config(JobConfig, None, ["rl.eval_interval=10"]))
    with pytest.raises(ValueError, match="rl.eval_interval"):
        load_config(JobConfig, None, ["rl.eval_interval=-1"])
