"""The study's aggregation on hand-made inputs: mean ± 95% CI per arm, curves, file readers."""

from __future__ import annotations

import json
import math

import pytest

from megatron_longact.study.harness import StudyConfig, _rl_command, claim, collect
from megatron_longact.study.report import (
    arm_summaries,
    details_table,
    gain_table,
    paired_table,
    read_curve,
    runs_table,
    split_table,
    write_report,
)
from megatron_longact.study.stats import (
    format_table,
    mean_curve,
    seed_arm_split,
    summarize,
    t_quantile_975,
)


def test_summary_by_hand():
    # values 0.2, 0.4, 0.6: mean 0.4, sd 0.2, n 3 -> half-width 4.303 * 0.2 / sqrt(3).
    s = summarize([0.2, 0.4, 0.6], arm="massive")
    assert s.n == 3 and s.mean == pytest.approx(0.4)
    assert s.ci95 == pytest.approx(4.303 * 0.2 / math.sqrt(3))
    assert math.isnan(summarize([0.5], arm="one").ci95)
    assert summarize([0.3, 0.3], arm="flat").ci95 == 0.0


def test_t_quantiles_match_tables():
    assert t_quantile_975(1) == 12.706 and t_quantile_975(2) == 4.303
    assert t_quantile_975(30) == 2.042 and t_quantile_975(200) == 1.96
    with pytest.raises(ValueError, match="at least 2"):
        t_quantile_975(0)


def test_seed_arm_split_by_hand():
    # Grid [[1, 3], [2, 6]]: grand mean 3; arm means 2, 4 -> SS 2 * (1 + 1) = 4; seed means
    # 1.5, 4.5 -> SS 2 * (2.25 + 2.25) = 9; total 4 + 0 + 1 + 9 = 14; residual 1 on 1 dof.
    split = seed_arm_split([[1.0, 3.0], [2.0, 6.0]])
    assert (split.share_arm, split.share_seed) == (pytest.approx(4 / 14), pytest.approx(9 / 14))
    assert split.share_residual == pytest.approx(1 / 14)
    assert (split.f_arm, split.f_seed, split.residual_sd) == (
        pytest.approx(4.0), pytest.approx(9.0), pytest.approx(1.0))  # fmt: skip
    # Paired difference sd sqrt(2): (1.96 * 1.414 / 1)^2 = 7.7 -> 8 seeds; / 2 -> 1.9 -> 2.
    assert (split.seeds_for(1.0), split.seeds_for(2.0)) == (8, 2)
    with pytest.raises(ValueError, match="full grid"):
        seed_arm_split([[1.0, 2.0], [3.0]])


def test_mean_curve_over_seeds_with_ragged_steps():
    curve = mean_curve([{1: 0.0, 2: 0.5}, {1: 1.0, 2: 0.5, 3: 0.25}])
    assert curve[1][0] == pytest.approx(0.5)
    assert curve[1][1] == pytest.approx(12.706 * math.sqrt(0.5) / math.sqrt(2))
    assert curve[2] == (pytest.approx(0.5), 0.0)
    assert curve[3][0] == 0.25 and math.isnan(curve[3][1])


def _write_run(root, arm: str, seed: int, *, heldout: dict, rewards: dict, greedy: float) -> None:
    """A finished RL run's metrics.jsonl as rl/loop.py writes it (step and held-out lines)."""
    run = root / "rl" / f"{arm}-s{seed}"
    (run / "tb").mkdir(parents=True)
    lines = [{"step": s, "rollout/reward_mean": r} for s, r in rewards.items()]
    lines += [{"step": s, "heldout/accuracy": a, "heldout/accuracy_se": 0.02,
               "heldout/greedy_accuracy": greedy if s else 0.5, "heldout/pass@8": 0.9 - a}
              for s, a in heldout.items()]  # fmt: skip
    (run / "tb" / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (run / "done").write_text("")


def test_collect_table_and_report(tmp_path):
    rewards = {s: 1.0 + 0.01 * s for s in range(1, 21)}
    for arm, seed, final in (("dense", 1, 0.3), ("dense", 2, 0.5), ("massive", 1, 0.6),
                             ("massive", 2, 0.6)):  # fmt: skip
        _write_run(tmp_path, arm, seed, heldout={0: 0.25, 10: 0.3, 20: final}, rewards=rewards,
                   greedy=0.55)  # fmt: skip
    _write_run(tmp_path, "min", 1, heldout={0: 0.25}, rewards={}, greedy=0.5)
    (tmp_path / "rl" / "min-s1" / "done").unlink()  # unfinished: left out
    result = collect(tmp_path, arms=["dense", "massive", "min"], seeds=range(1, 4))
    assert result.sft_accuracy == 0.25 and result.sft_greedy == 0.5
    assert result.accuracy == {"dense": {1: 0.3, 2: 0.5}, "massive": {1: 0.6, 2: 0.6}}
    assert result.greedy["dense"] == {1: 0.55, 2: 0.55}
    summaries = arm_summaries(result)
    assert [s.arm for s in summaries] == ["dense", "massive"]
    table = format_table(summaries, metric="acc")
    assert "| dense | 2 | 40.0 ± 127.1 | 30.0, 50.0 |" in table  # 12.706 * 0.1414 / 1.414
    assert "| massive | 2 | 60.0 ± 0.0 | 60.0, 60.0 |" in table
    # Gain 0.6 - 0.25; rewards 1.01..1.10 first ten steps, 1.11..1.20 last ten.
    assert "| massive | +35.0 ± 0.0 | 55.0 ± 0.0 | 2.0 | 1.055 -> 1.155 |" in details_table(result)
    # Same-seed differences to the first arm: 0.6 - 0.3 and 0.6 - 0.5.
    assert "| massive | 2 | +20.0 ± 127.1 | +30.0, +10.0 |" in paired_table(result)
    # Pooled over the 4 runs: gains 0.05 at step 10 in all, 0.05/0.25/0.35/0.35 at step 20
    # (mean 0.25, sd 0.1414, 3.182 * 0.1414 / 2 = 0.225); greedy 0.55 - 0.5; reward +0.1.
    gains = gain_table(result)
    assert "| mean@k at step 10, pp | 4 | +5.0 ± 0.0 | 0.0 | +5.0 .. +5.0 | 4 of 4 |" in gains
    assert "| mean@k at step 20, pp | 4 | +25.0 ± 22.5 | 14.1 | +5.0 .. +35.0 | 4 of 4 |" in gains
    assert "| greedy at the last step, pp | 4 | +5.0 ± 0.0 |" in gains
    assert "| reward, last - first 10 steps | 4 | +0.100 ± 0.000 |" in gains
    # Final values in pp [[30, 50], [60, 60]]: SS arm 400, seed 100, residual 100 of 600.
    split = split_table(result)
    assert "| arm | 67% | 4.00 (1, 1) |" in split and "| seed | 17% | 1.00 (1, 1) |" in split
    assert "| residual | 17% | sd 10.00 pp |" in split and "769 seeds per arm" in split
    runs = runs_table(result)
    assert "| run | mean@8 at 10 | mean@8 at 20 | greedy at last | pass@8 at last |" in runs
    assert "| dense-s1 | 30.0 | 30.0 ± 2.0 | 55.0 | 60.0 | 1.055 -> 1.155 |" in runs
    config = StudyConfig(sft_config="a", rl_config="b", eval_data="c", out_dir=str(tmp_path))
    write_report(result, out=tmp_path, config=config)
    saved = json.loads((tmp_path / "study.json").read_text())
    assert saved["summary"][1]["mean"] == pytest.approx(0.6)
    assert (tmp_path / "study.png").stat().st_size > 0
    assert (
        "SFT model (step 0 of every RL run): 25.0% held-out mean@8, 50.0% greedy"
        in (tmp_path / "study.md").read_text()
    )
    with pytest.raises(ValueError, match="no finished RL run"):
        collect(tmp_path, arms=["random"], seeds=[1])


def test_step_0_is_evaluated_once_and_starts_every_curve(tmp_path):
    # Every run starts from the same SFT model under the same evaluation seed: only the first
    # job (first arm, seed 1) evaluates step 0; the others' curves start from its value.
    config = StudyConfig(sft_config="a", rl_config="b.yaml", eval_data="val.jsonl",
                         out_dir=str(tmp_path), arms=["dense", "massive"])  # fmt: skip
    for arm, seed, first in (("dense", 1, True), ("massive", 1, False), ("dense", 2, False)):
        command = _rl_command(config, arm, seed, sft=tmp_path / "sft", run=tmp_path / "r")
        assert f"rl.eval_at_start={str(first).lower()}" in command, command
    rewards = {1: 1.0, 2: 1.1}
    _write_run(tmp_path, "dense", 1, heldout={0: 0.25, 2: 0.3}, rewards=rewards, greedy=0.5)
    _write_run(tmp_path, "massive", 1, heldout={2: 0.4}, rewards=rewards, greedy=0.5)
    result = collect(tmp_path, arms=["massive", "dense"], seeds=[1])
    assert result.sft_accuracy == 0.25
    assert result.heldout["massive"][1] == {0: 0.25, 2: 0.4}


def test_rl_command_sets_arm_seed_and_held_out_evaluation(tmp_path):
    config = StudyConfig(sft_config="a", rl_config="b.yaml", eval_data="val.jsonl",
                         out_dir=str(tmp_path), eval_interval=20, num_samples=4, eval_prompts=50,
                         rl_overrides=["train.train_steps=100"])  # fmt: skip
    command = _rl_command(config, "massive-0.1", 3, sft=tmp_path / "sft", run=tmp_path / "r")
    for expected in ("longact.strategy=massive", "longact.ratio=0.1", "rl.seed=3",
                     "rl.eval_interval=20", "eval.num_samples=4", "rl.eval_num_prompts=50",
                     "eval.synthetic_kv_path=val.jsonl", "train.train_steps=100"):  # fmt: skip
        assert expected in command, (expected, command)


def test_read_curve(tmp_path):
    lines = [{"step": 1, "rollout/reward_mean": 0.5}, {"step": 1, "loss": 2.0},
             {"step": 2, "rollout/reward_mean": 0.75}]  # fmt: skip
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert read_curve(tmp_path / "m.jsonl") == {1: 0.5, 2: 0.75}


def test_a_run_claimed_by_a_live_process_is_left_to_it(tmp_path):
    import os
    import subprocess
    import sys

    run = tmp_path / "rl" / "dense-s1"
    assert claim(run) and (run / "claimed").read_text().strip() == str(os.getpid())
    assert claim(run)  # our own claim
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (run / "claimed").write_text(f"{other.pid}\n")
        assert not claim(run)
    finally:
        other.kill()
        other.wait()
    assert claim(run)  # the holder died: taken over
