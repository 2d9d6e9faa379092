"""Sampled held-out metrics: pass@k, mean@k with its standard error, the sampled runner pass and
its table columns."""

from __future__ import annotations

import math
import random
from itertools import combinations

import pytest

from megatron_longact.config.schema import EvalConfig
from megatron_longact.data.rl_data import RLRecord
from megatron_longact.eval import synthetic_kv
from megatron_longact.eval.cli import KV_TABLE
from megatron_longact.eval.report import render_csv, render_markdown, with_sampled
from megatron_longact.eval.runner import (
    evaluate_sampled,
    predictions_path,
    read_predictions,
    sampled_suite_name,
)
from megatron_longact.stats import mean_and_se, pass_at_k, pass_ks


def test_pass_at_k_is_the_fraction_of_k_subsets_holding_a_correct_sample():
    # The estimator's definition (Chen et al. 2021, Eq. 1): over all C(n, k) subsets of the n
    # samples, the fraction with at least one correct one; checked by enumeration.
    for n in range(1, 8):
        for c in range(n + 1):
            outcomes = [1] * c + [0] * (n - c)
            for k in range(1, n + 1):
                subsets = list(combinations(outcomes, k))
                expected = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)
    assert pass_at_k(8, 2, 1) == pytest.approx(2 / 8)  # pass@1 is the mean accuracy
    with pytest.raises(ValueError, match="pass@k"):
        pass_at_k(4, 1, 5)
    assert pass_ks(8) == [1, 2, 4, 8] and pass_ks(6) == [1, 2, 4, 6] and pass_ks(1) == [1]


def test_mean_and_se():
    mean, se = mean_and_se([1.0, 0.0, 1.0, 0.0])
    assert mean == 0.5 and se == pytest.approx(math.sqrt(1 / 3 / 4))
    assert math.isnan(mean_and_se([0.7])[1]) and math.isnan(mean_and_se([])[0])
    assert mean_and_se([1.0, float("nan"), 0.0])[0] == 0.5  # NaN (no such column) is skipped


def _records(n: int) -> list[RLRecord]:
    return [
        RLRecord(
            id=f"r{i}",
            context=f"The code of k{i} is {1000 + i}.",
            question=f"k{i}?",
            answer=str(1000 + i),
            choices=None,
            source="kv",
        )  # fmt: skip
        for i in range(n)
    ]


def _coin_sampler(calls: list):
    """Answers prompt i correctly with probability (i % 4) / 4, from the call's seed."""

    def sample(prompts: list[str], *, temperature: float, seed: int) -> list[str]:
        calls.append((len(prompts), temperature, seed))
        rng = random.Random(seed)
        out = []
        for prompt in prompts:
            i = int(prompt.split("The code of k")[1].split(" ")[0])
            ok = rng.random() < (i % 4) / 4
            out.append(f"<think>x</think><answer>{1000 + i if ok else 0}</answer>")
        return out

    return sample


def test_evaluate_sampled_scores_resumes_and_reproduces(tmp_path):
    suite, records, calls = synthetic_kv.make_suite(), _records(12), []
    kwargs = dict(num_samples=4, temperature=1.0, seed=3, batch_size=5, show_progress=False)
    scores = evaluate_sampled(suite, records, _coin_sampler(calls), out_dir=tmp_path, **kwargs)
    # 3 calls of 5, 5, 2 prompts x 4 samples, each with its own seed.
    assert [c[0] for c in calls] == [20, 20, 8] and len({c[2] for c in calls}) == 3
    lines = read_predictions(predictions_path(tmp_path, sampled_suite_name(suite.name, 1.0)))
    assert len(lines) == 12 and all(len(r["samples"]) == 4 for r in lines)
    per_prompt = [100 * sum(s["correct"] for s in r["samples"]) / 4 for r in lines]
    mean, se = mean_and_se(per_prompt)
    assert scores["KV-Acc"] == pytest.approx(mean) and scores["KV-Acc SE"] == pytest.approx(se)
    assert scores["KV-Format"] == 100.0 and scores["KV-Format SE"] == 0.0
    assert scores["pass@1"] == pytest.approx(scores["KV-Acc"])
    assert scores["pass@4"] >= scores["pass@2"] >= scores["pass@1"]
    assert scores["samples_per_prompt"] == 4.0 and scores["temperature"] == 1.0
    # Every prompt is done: a rerun generates nothing; a fresh run with the seed draws the same.
    assert evaluate_sampled(suite, records, _coin_sampler(calls), out_dir=tmp_path,
                            **kwargs) == scores and len(calls) == 3  # fmt: skip
    again = evaluate_sampled(suite, records, _coin_sampler([]), out_dir=tmp_path / "b", **kwargs)
    assert again == scores
    with pytest.raises(ValueError, match="temperature > 0"):
        evaluate_sampled(suite, records, _coin_sampler([]), out_dir=tmp_path,
                         **{**kwargs, "temperature": 0.0})  # fmt: skip


def test_kv_table_shows_greedy_and_mean_at_k_with_errors_and_differences():
    base = {"KV-Acc": 40.0, "KV-Format": 90.0}
    sampled = {"KV-Acc": 37.5, "KV-Acc SE": 3.0, "KV-Format": 95.0, "KV-Format SE": 1.0,
               "pass@8": 80.0, "pass@8 SE": 4.0, "samples_per_prompt": 8.0,
               "temperature": 1.0}  # fmt: skip
    spec, sft = with_sampled(KV_TABLE, base, sampled)
    _, rl = with_sampled(KV_TABLE, {"KV-Acc": 41.0, "KV-Format": 92.0},
                         {**sampled, "KV-Acc": 41.5, "KV-Acc SE": 4.0})  # fmt: skip
    assert spec.columns == ("KV-Acc", "KV-Format", "KV-Acc mean@8", "KV-Format mean@8", "pass@8")
    md = render_markdown({"SFT": sft, "RL": rl}, spec, baseline="SFT", bold_best=False)
    assert "8 samples at T=1" in md
    assert "| SFT | 40.00 | 90.00 | 37.50 ± 3.00 | 95.00 ± 1.00 | 80.00 ± 4.00 |" in md
    # The difference row: 41.5 - 37.5 = +4.00, error sqrt(3^2 + 4^2) = 5.00.
    assert "| RL vs SFT | +1.00 | +2.00 | +4.00 ± 5.00 |" in md
    header = render_csv({"SFT": sft}, spec).splitlines()[0]
    assert header == ("Model,KV-Acc,KV-Format,KV-Acc mean@8,KV-Acc mean@8 SE,KV-Format mean@8,"
                      "KV-Format mean@8 SE,pass@8,pass@8 SE")  # fmt: skip
    assert with_sampled(KV_TABLE, base, None) == (KV_TABLE, base)


def test_eval_config_rejects_bad_sampling():
    with pytest.raises(ValueError, match="eval.num_samples"):
        EvalConfig(num_samples=-1)
    with pytest.raises(ValueError, match="sample_temperature"):
        EvalConfig(num_samples=8, sample_temperature=0.0)


def test_longact_eval_tables_greedy_and_mean_at_k_with_paired_errors(tmp_path):
    """``run_eval`` with a coin-flip backend (the only stand-in): two models on the same 12
    prompts; the RL row's difference error is the paired one, recomputed here by hand."""
    from megatron_longact.config import JobConfig, load_config
    from megatron_longact.data.rl_data import write_rl_jsonl
    from megatron_longact.eval.cli import run_eval
    from megatron_longact.eval.runner import paired_difference
    from megatron_longact.stats import mean_and_se

    data = tmp_path / "kv.jsonl"
    write_rl_jsonl(_records(12), data)

    def backend(shift: int):
        def make(job, tokenizer):
            sample = _coin_sampler([])

            def complete(model_inputs, *, max_new_tokens, temperature=None, seed=None):
                if temperature is None:  # greedy: right on every other prompt
                    return [f"<answer>{1000 + i if i % 2 else 0}</answer>"
                            for i in range(len(model_inputs))]  # fmt: skip
                return sample(model_inputs, temperature=temperature, seed=seed + shift)

            return complete

        return make

    common = ["eval.suites=[synthetic_kv]", f"eval.synthetic_kv_path={data}",
              "eval.num_samples=8", "eval.batch_size=4", "logging.progress=false"]  # fmt: skip
    sft, rl = tmp_path / "sft", tmp_path / "rl"
    run_eval(load_config(JobConfig, None, [*common, f"eval.out_dir={sft}", "eval.model_name=SFT"]),
             backend=backend(0))  # fmt: skip
    (table,) = run_eval(load_config(JobConfig, None, [
        *common, f"eval.out_dir={rl}", "eval.model_name=RL", f"eval.compare=[{sft}]"]),
        backend=backend(1))  # fmt: skip
    md = table.read_text()
    assert "KV-Acc mean@8" in md and "pass@8" in md and "| RL vs SFT |" in md
    name = sampled_suite_name("synthetic_kv", 1.0)
    mean, se, n = paired_difference(
        synthetic_kv.make_suite(),
        read_predictions(predictions_path(rl, name)),
        read_predictions(predictions_path(sft, name)),
        "KV-Acc",
    )
    delta_row = next(line for line in md.splitlines() if line.startswith("| RL vs SFT"))
    assert n == 12 and f"{mean:+.2f} ± {se:.2f}" in delta_row, (delta_row, mean, se)
    # Greedy columns carry their SE over prompts too (one 0/1 answer per prompt: the binomial
    # SE), and the difference row the paired one (both models answer alike: 0 ± 0).
    greedy = [100.0 * r["correct"] for r in read_predictions(predictions_path(sft, "synthetic_kv"))]
    g_mean, g_se = mean_and_se(greedy)
    assert len(greedy) == 12 and 0 < g_mean < 100
    sft_row = next(line for line in md.splitlines() if line.startswith("| SFT |"))
    assert f"{g_mean:.2f}** ± {g_se:.2f}" in sft_row, (sft_row, g_mean, g_se)
    assert delta_row.split("|")[2].strip() == "+0.00 ± 0.00", delta_row
