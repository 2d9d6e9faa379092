"""The whole pipeline on a real model and tokenizer, as a user runs it (slow; CI runs it after
the main suite).

SmolLM2-135M-Instruct (HF folder from ``longact import-gguf``) -> ``longact sft`` from its HF
weights on the synthetic key-value task -> ``longact rl`` (DAPO + LongAct, default stop strings)
-> ``longact convert`` -> ``longact eval``. Each stage is the real CLI in its own process,
configured by the recipes beside this file plus paths only, so the package defaults must work
on a real model: a multi-token ``</answer>`` stop, SmolLM2's own chat template (default system
prompt), 9 heads at TP=1.

Asserts: SFT starts from the HF weights and raises the held-out format rate above the base
model's (0 for SmolLM2, which does not write ``<answer>`` tags unprompted); every RL step keeps a
non-empty batch; the export loads in transformers with logits equal to the megatron
checkpoint's; eval writes its tables.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_longact.runtime.launch import run_local

HERE = Path(__file__).parent
SFT_STEPS, RL_STEPS = 16, 2  # the recipes' train.train_steps, checked against the logs
LOGITS_ATOL = 2e-3  # fp32, 30 layers: megatron's and transformers' summation orders differ
BASE_EVAL_SAMPLES = 8


def longact(*args: str, log: Path) -> str:
    """Runs ``longact ARGS`` as a user would (its own process); returns its output, fails the
    test with the output's tail when it exits non-zero."""
    result = subprocess.run([sys.executable, "-m", "megatron_longact.cli", *args],
                            capture_output=True, text=True)  # fmt: skip
    output = result.stdout + result.stderr
    log.write_text(output)
    assert result.returncode == 0, (
        f"longact {args[0]} failed (rc {result.returncode}):\n" + (output[-4000:])
    )
    return output


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _base_format_rate(hf_dir: Path, rl_val: Path) -> float:
    """Share of held-out prompts the base model answers with ``<answer>`` and ``</think>``
    (greedy, transformers, the eval's own prompt and chat template)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_longact.data.rl_data import load_rl_jsonl
    from megatron_longact.eval import synthetic_kv
    from megatron_longact.eval.backends import chat_prompt

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    records = load_rl_jsonl(rl_val)[:BASE_EVAL_SAMPLES]
    suite = synthetic_kv.make_suite()
    formatted = 0.0
    for record in records:
        ids = tokenizer(chat_prompt(tokenizer, suite.build_prompt(record)),
                        add_special_tokens=False, return_tensors="pt").input_ids  # fmt: skip
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=64, do_sample=False)
        response = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=False)
        formatted += synthetic_kv.score_sample(record, response)["formatted"]
    return formatted / len(records)


def _export_logits(hf_dir: Path, tokens: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                 attn_implementation="eager").eval()  # fmt: skip
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens])).logits[0]


@pytest.mark.slow
def test_smollm2_sft_rl_convert_eval(smollm2_dir, tmp_path):
    from megatron_longact.data.prompts import encode_prompt
    from megatron_longact.data.rl_data import load_rl_jsonl
    from megatron_longact.data.tokenizer import load_tokenizer

    data, logs = tmp_path / "data", tmp_path / "logs"
    logs.mkdir()
    longact("data", "--out-dir", str(data), "--tokenizer", str(smollm2_dir),
            "--context-tokens", "96", "--sft-train", "160", "--sft-val", "8",
            "--rl-train", "48", "--rl-val", "8", "--seed", "1234", log=logs / "data.log")  # fmt: skip
    model = [f"model.hf_path={smollm2_dir}", f"data.tokenizer_path={smollm2_dir}"]

    # SFT from the HF weights.
    sft = tmp_path / "sft"
    out = longact("sft", "--config", str(HERE / "smollm2_sft.yaml"), *model,
                  f"data.train_path={data / 'sft_train.jsonl'}", f"checkpoint.save_dir={sft}",
                  f"logging.tensorboard_dir={tmp_path / 'sft_tb'}", log=logs / "sft.log")  # fmt: skip
    assert "init: Hugging Face weights" in out
    sft_metrics = _metrics(tmp_path / "sft_tb" / "metrics.jsonl")
    assert [m["step"] for m in sft_metrics] == list(range(1, SFT_STEPS + 1))
    # A pretrained start: far below a random model's ln(49152) = 10.8 nats.
    assert sft_metrics[0]["train/loss"] < 4.0, sft_metrics[0]

    evaluate = ["--config", str(HERE / "smollm2_eval.yaml"), *model,
                f"eval.synthetic_kv_path={data / 'rl_val.jsonl'}"]  # fmt: skip
    longact("eval", *evaluate, f"checkpoint.load_dir={sft}", f"eval.out_dir={tmp_path / 'ev_sft'}",
            "eval.model_name=SFT", log=logs / "eval_sft.log")  # fmt: skip
    sft_format = json.loads((tmp_path / "ev_sft" / "synthetic_kv.scores.json").read_text())
    base_format = 100.0 * _base_format_rate(smollm2_dir, data / "rl_val.jsonl")
    assert sft_format["KV-Format"] > base_format, (sft_format, base_format)
    assert sft_format["KV-Format"] > 0

    # DAPO + LongAct with the default stop strings; every step keeps a batch and updates.
    rl = tmp_path / "rl"
    longact("rl", "--config", str(HERE / "smollm2_rl.yaml"), *model,
            f"data.train_path={data / 'rl_train.jsonl'}", f"checkpoint.load_dir={sft}",
            f"checkpoint.save_dir={rl}", f"logging.tensorboard_dir={tmp_path / 'rl_tb'}",
            log=logs / "rl.log")  # fmt: skip
    rl_metrics = _metrics(tmp_path / "rl_tb" / "metrics.jsonl")
    assert [m["step"] for m in rl_metrics] == list(range(1, RL_STEPS + 1))
    for m in rl_metrics:
        assert m["rollout/num_groups"] >= 1 and "train/loss" in m, m
        # LongAct was on: about lambda = 0.3 of the Q/K rows trained.
        fractions = [v for k, v in m.items() if "trainable" in k]
        assert fractions and all(0.2 < f < 0.4 for f in fractions), m

    # Export, and the export's logits equal the megatron checkpoint's.
    hf_out = tmp_path / "hf_rl"
    longact("convert", "--direction", "mcore2hf", "--load", str(rl), "--out", str(hf_out),
            "--quiet", log=logs / "convert.log")  # fmt: skip
    tokenizer = load_tokenizer(hf_out)
    tokens = encode_prompt(load_rl_jsonl(data / "rl_val.jsonl")[0], tokenizer,
                           max_prompt_tokens=256)  # fmt: skip
    (megatron,) = run_local(megatron_logits, 1, model, load_dir=str(rl), tokens=tokens)
    exported = _export_logits(hf_out, tokens)
    assert exported.shape == megatron.shape
    diff = (exported - megatron).abs().max().item()
    assert diff < LOGITS_ATOL, diff

    # Eval of the RL model next to the SFT row: both tables written.
    ev_rl = tmp_path / "ev_rl"
    longact("eval", *evaluate, f"checkpoint.load_dir={rl}", f"eval.out_dir={ev_rl}",
            "eval.model_name=SFT + DAPO + LongAct", f"eval.compare=[{tmp_path / 'ev_sft'}]",
            log=logs / "eval_rl.log")  # fmt: skip
    for table in ("table_synthetic_kv.md", "table_ruler.md"):
        text = (ev_rl / table).read_text()
        assert "SFT + DAPO + LongAct" in text and "| SFT " in text, text
    print(
        f"smoke: base format {base_format:.1f}%, SFT {sft_format}, RL kept groups "
        f"{[m['rollout/num_groups'] for m in rl_metrics]}, export logits max diff {diff:.2e}"
    )
    # The checkpoints hold Adam states (~2 GB each); keep the logs, tables and export only.
    for folder in (sft, rl):
        shutil.rmtree(folder)


def megatron_logits(overrides: list[str], *, load_dir: str, tokens: list[int]) -> torch.Tensor:
    """Full-vocab logits [s, V] (fp32) of the megatron checkpoint ``load_dir`` on ``tokens``,
    built from the job that ``overrides`` describe (TP=1, one process)."""
    from megatron_longact.config import JobConfig, load_config
    from megatron_longact.models.gpt import load_architecture, make_transformer_config
    from megatron_longact.runtime.distributed import init_distributed
    from megatron_longact.runtime.setup import build_frozen_model

    job = load_config(JobConfig, None, overrides)
    dims = init_distributed(job.parallel, seed=job.train.seed)
    arch = load_architecture(job.model)
    config = make_transformer_config(arch, model=job.model, parallel=job.parallel, train=job.train)
    model = build_frozen_model(job, arch=arch, transformer_config=config, dims=dims,
                               load_dir=load_dir)  # fmt: skip
    ids = torch.tensor([tokens])
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=torch.arange(len(tokens))[None],
                       attention_mask=None)  # fmt: skip
    return logits[0, :, : arch.vocab_size].float().cpu()
