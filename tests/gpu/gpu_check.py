"""The GPU check: the package's CUDA path on one GPU, in under 8 minutes, as one prepared run.

Every CPU test runs through the compatibility layer; this script runs what only a CUDA machine
can: device placement, bf16 on CUDA with fp32 master weights, CUDA RNG, fused kernels, the GPU
memory figures and timings. It runs each stage in its own process (a crash or hang in one does
not take the others with it), under a per-stage time limit and an overall deadline, and writes
one JSON of the figures (``gpu_check.json``) and a log (``gpu_check.log``) to ``--out``.

    python tests/gpu/gpu_check.py --out OUT            # on the GPU machine (see run_gpu_check.sh)
    python tests/gpu/gpu_check.py --out OUT --dry-run  # anywhere: arguments and result schema

Stages (figures in ``stages.<name>.figures``):
- ``sft_tiny``: bf16 SFT on CUDA from a tiny HF folder vs the same run in fp32 on the CPU (a
  child process with ``CUDA_VISIBLE_DEVICES=``): first losses agree to bf16 tolerance, fall.
- ``sft_0p5b``: bf16 SFT steps of a ~0.5B Qwen3-shaped model (built from a config dict) with the
  distributed optimizer: finite, falling losses, peak memory.
- ``master_reload``: SFT -> weights-only load -> one step at lr=0 leaves the weights equal to the
  loaded ones (the distributed optimizer's fp32 masters must follow the load).
- ``longact_overhead``: ``benchmarks/longact_overhead.py`` on the 0.5B config at 4K tokens:
  step-time and peak-memory ratios, LongAct vs dense (targets <= 1.01 each).
- ``rollout_throughput``: ``benchmarks/rollout_throughput.py``: native engine vs transformers
  ``generate`` tokens/s.
- ``dapo_longact``: 3 DAPO + LongAct steps with the native engine on CUDA after a short SFT.
- ``rl_packing``: chunked log-probs on CUDA at the 152K vocabulary (values and gradients equal
  unchunked, lower peak memory), then ``benchmarks/rl_step_padding.py`` on the 0.5B config:
  packed vs padded real-token throughput, padding fraction, peak memory (target >= 1.5x,
  <= 1x). Leave it out with ``--skip rl_packing``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCHEMA_VERSION = 1
TOTAL_BUDGET_S = 470.0
"""The whole check ends inside 8 minutes (the H200 lease allows 10 per command)."""
BF16_LOSS_RTOL = 2e-2
"""bf16 keeps 8 mantissa bits: a loss of ~7 after a few matmuls agrees to about 1% with fp32."""


@dataclass(frozen=True)
class Stage:
    name: str
    budget_s: float
    """Wall-clock limit of the stage's process, start-up included."""


STAGES = (
    Stage("sft_tiny", 70),
    Stage("sft_0p5b", 80),
    Stage("master_reload", 60),
    Stage("longact_overhead", 90),
    Stage("rollout_throughput", 50),
    Stage("dapo_longact", 60),
    Stage("rl_packing", 60),
)
STAGE_NAMES = tuple(s.name for s in STAGES)

# A Qwen3-0.6B-shaped config (hidden 1024, 28 layers, 16 q heads, 8 kv heads, head_dim 128),
# 24 layers to stay near 0.5B parameters with the full 151,936-token vocabulary.
QWEN3_0P5B = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "vocab_size": 151936,
    "torch_dtype": "bfloat16",
}


def result_skeleton(*, dry_run: bool) -> dict:
    """The result JSON with every stage present and not run (the schema the CI test checks)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "dry_run": dry_run,
        "env": {},
        "total_s": 0.0,
        "budget_s": TOTAL_BUDGET_S,
        "stages": {
            s.name: {
                "status": "not_run",
                "seconds": 0.0,
                "figures": {},
                "checks": {},
                "error": None,
            }
            for s in STAGES
        },
    }


def validate_result(result: dict) -> None:
    """Raises ValueError when ``result`` does not follow the schema of :func:`result_skeleton`."""
    want = result_skeleton(dry_run=result.get("dry_run", False))
    missing = want.keys() - result.keys()
    if missing:
        raise ValueError(f"result lacks {sorted(missing)}")
    if set(result["stages"]) != set(STAGE_NAMES):
        raise ValueError(f"stages {sorted(result['stages'])} != {sorted(STAGE_NAMES)}")
    for name, stage in result["stages"].items():
        if stage.get("status") not in {"not_run", "ok", "failed", "skipped", "timeout"}:
            raise ValueError(f"stage {name}: bad status {stage.get('status')!r}")
        for key in ("seconds", "figures", "checks", "error"):
            if key not in stage:
                raise ValueError(f"stage {name} lacks {key!r}")
        if stage["status"] == "ok" and not all(stage["checks"].values()):
            raise ValueError(f"stage {name} is ok with a failed check: {stage['checks']}")


# --- helpers run inside a stage's process -------------------------------------------------------


def _write_hf_folder(out: Path, config: dict, *, seed: int, save_weights: bool) -> Path:
    """A Hugging Face folder: ``config.json`` (+ seeded random weights, + the tiny tokenizer)."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    tokenizer = REPO / "megatron_longact" / "assets" / "tiny_tokenizer"
    for f in tokenizer.iterdir():
        shutil.copy(f, out / f.name)
    if save_weights:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out))
        model.to(torch.float32).save_pretrained(out)
    return out


def _tiny_config() -> dict:
    """The shipped tiny-qwen3 ``config.json`` (the CPU/CUDA comparison model)."""
    return json.loads((REPO / "megatron_longact/assets/models/tiny-qwen3/config.json").read_text())


def _synthetic_data(out: Path, *, context_tokens: int) -> Path:
    from megatron_longact.data.make_synthetic import main as make_synthetic

    make_synthetic(["--out-dir", str(out), "--context-tokens", str(context_tokens),
                    "--sft-train", "64", "--sft-val", "8", "--rl-train", "32", "--rl-val", "8",
                    "--seed", "7"])  # fmt: skip
    return out


def _run_job(command: str, overrides: list[str]) -> list[dict]:
    """Runs ``longact sft|rl`` in a child process (a fresh world each time); returns its metrics."""
    tb = Path(tempfile.mkdtemp(prefix="tb_"))
    args = [sys.executable, "-m", "megatron_longact.cli", command, *overrides,
            f"logging.tensorboard_dir={tb}", "logging.progress=false"]  # fmt: skip
    subprocess.run(args, check=True, cwd=REPO)
    return [json.loads(line) for line in (tb / "metrics.jsonl").read_text().splitlines()]


def _falls(losses: list[float]) -> bool:
    return all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def stage_sft_tiny(work: Path) -> dict:
    import torch

    config = _tiny_config()
    hf = _write_hf_folder(work / "hf_tiny", config, seed=0, save_weights=True)
    data = _synthetic_data(work / "data", context_tokens=96)
    common = [f"model.hf_path={hf}", f"data.train_path={data / 'sft_train.jsonl'}",
              "data.seq_length=256", "data.micro_batch_size=4", "data.global_batch_size=8",
              "optim.lr=1e-3", "optim.warmup_steps=0", "train.train_steps=6"]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    tb = work / "tb_cpu"
    subprocess.run([sys.executable, "-m", "megatron_longact.cli", "sft", *common,
                    "train.precision=fp32", f"logging.tensorboard_dir={tb}",
                    "logging.progress=false"], check=True, cwd=REPO, env=env)  # fmt: skip
    cpu = [json.loads(x)["train/loss"] for x in (tb / "metrics.jsonl").read_text().splitlines()]
    gpu = [m["train/loss"] for m in _run_job("sft", [*common, "train.precision=bf16"])]
    rel = [abs(g - c) / abs(c) for g, c in zip(gpu[:3], cpu[:3])]
    return {
        "figures": {
            "cpu_fp32_losses": cpu,
            "cuda_bf16_losses": gpu,
            "first3_rel_diff": rel,
            "device": torch.cuda.get_device_name(0),
        },  # fmt: skip
        "checks": {"falls": _falls(gpu), "first_losses_match_cpu_fp32": max(rel) < BF16_LOSS_RTOL},
    }


def stage_sft_0p5b(work: Path) -> dict:
    import torch

    hf = _write_hf_folder(work / "hf_0p5b", QWEN3_0P5B, seed=0, save_weights=False)
    data = _synthetic_data(work / "data", context_tokens=1500)
    torch.cuda.reset_peak_memory_stats()
    metrics = _run_job("sft", [f"model.hf_path={hf}", "model.init=random",
                               f"data.train_path={data / 'sft_train.jsonl'}",
                               "data.seq_length=2048", "data.micro_batch_size=1",
                               "data.global_batch_size=4", "optim.lr=3e-4",
                               "optim.warmup_steps=0", "train.train_steps=8",
                               "train.precision=bf16"])  # fmt: skip
    losses = [m["train/loss"] for m in metrics]
    return {
        "figures": {"losses": losses, "tokens_per_s": [m["train/tokens_per_s"] for m in metrics]},
        "checks": {"falls": _falls(losses)},
    }


def stage_master_reload(work: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    config = _tiny_config()
    hf = _write_hf_folder(work / "hf_tiny", config, seed=0, save_weights=False)
    data = _synthetic_data(work / "data", context_tokens=96)
    common = [f"model.hf_path={hf}", "model.init=random",
              f"data.train_path={data / 'sft_train.jsonl'}", "data.seq_length=256",
              "data.micro_batch_size=4", "data.global_batch_size=8", "optim.warmup_steps=0",
              "train.precision=bf16"]  # fmt: skip
    _run_job("sft", [*common, "optim.lr=3e-3", "train.train_steps=3",
                     f"checkpoint.save_dir={work / 'sft'}"])  # fmt: skip
    _run_job("sft", [*common, "optim.lr=0", "optim.min_lr=0", "train.train_steps=1",
                     f"checkpoint.load_dir={work / 'sft'}", "checkpoint.load_weights_only=true",
                     f"checkpoint.save_dir={work / 'reloaded'}"])  # fmt: skip
    exported = {}
    for name in ("sft", "reloaded"):
        subprocess.run([sys.executable, "-m", "megatron_longact.cli", "convert",
                        "--direction", "mcore2hf", "--load", str(work / name),
                        "--hf-dir", str(hf), "--out", str(work / f"{name}_hf")],
                       check=True, cwd=REPO)  # fmt: skip
        exported[name] = load_file(str(next((work / f"{name}_hf").glob("*.safetensors"))))
    max_diff = max(
        (exported["sft"][k].float() - exported["reloaded"][k].float()).abs().max().item()
        for k in exported["sft"]
    )
    return {
        "figures": {"max_abs_weight_change_at_lr0": max_diff, "num_tensors": len(exported["sft"])},
        "checks": {"weights_kept": max_diff == 0.0 and bool(torch.cuda.is_available())},
    }


def _script(script: str, args: list[str]) -> str:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args],
                          check=True, cwd=REPO, capture_output=True, text=True)  # fmt: skip
    print(proc.stdout)
    return proc.stdout


def stage_longact_overhead(work: Path) -> dict:
    hf = _write_hf_folder(work / "hf_0p5b", QWEN3_0P5B, seed=0, save_weights=False)
    out = _script("longact_overhead.py", ["--hf-path", str(hf), "--seq", "4096",
                                          "--micro-batches", "2", "--steps", "6"])  # fmt: skip
    step = float(re.search(r"step time .*?ratio ([0-9.]+)", out).group(1))
    memory = float(re.search(r"peak memory .*?ratio ([0-9.]+)", out).group(1))
    return {
        "figures": {"step_time_ratio": step, "peak_memory_ratio": memory, "seq": 4096},
        "checks": {
            "step_time_ratio_le_1.01": step <= 1.01,
            "peak_memory_ratio_le_1.01": memory <= 1.01,
        },
    }


def stage_rollout_throughput(work: Path) -> dict:
    config = _tiny_config()
    hf = _write_hf_folder(work / "hf_tiny", config, seed=0, save_weights=True)
    out = _script("rollout_throughput.py", ["--hf-dir", str(hf), "--batch", "16",
                                            "--new-tokens", "128"])  # fmt: skip
    ratio = float(re.search(r"ratio native/transformers ([0-9.]+)x", out).group(1))
    same = "greedy outputs identical: True" in out
    return {
        "figures": {"native_over_generate": ratio, "output": out[-2000:]},
        "checks": {"greedy_outputs_identical": same},
    }


def stage_dapo_longact(work: Path) -> dict:
    config = _tiny_config()
    hf = _write_hf_folder(work / "hf_tiny", config, seed=0, save_weights=False)
    data = _synthetic_data(work / "data", context_tokens=96)
    common = [f"model.hf_path={hf}", "model.init=random", "train.precision=bf16"]
    _run_job("sft", [*common, f"data.train_path={data / 'sft_train.jsonl'}",
                     "data.seq_length=256", "data.micro_batch_size=4", "data.global_batch_size=8",
                     "optim.lr=3e-3", "train.train_steps=30",
                     f"checkpoint.save_dir={work / 'sft'}"])  # fmt: skip
    metrics = _run_job("rl", [*common, f"data.train_path={data / 'rl_train.jsonl'}",
                              f"checkpoint.load_dir={work / 'sft'}", "train.train_steps=3",
                              "rl.prompts_per_step=4", "rl.rollouts_per_prompt=4",
                              "rl.max_new_tokens=48", "rl.max_seq_length=256",
                              "rl.dynamic_sampling=false", "rl.engine=native",
                              "longact.strategy=massive", "longact.ratio=0.3"])  # fmt: skip
    return {
        "figures": {
            k: [m.get(k) for m in metrics]
            for k in (
                "train/loss",
                "rollout/reward_mean",
                "rollout/engine_logprob_mismatch",
                "perf/generate_s",
                "perf/step_s",
            )
        },  # fmt: skip
        "checks": {
            "three_steps": len(metrics) == 3,
            "finite": all(math.isfinite(m["train/loss"]) for m in metrics),
        },  # fmt: skip
    }


# --- the driver ---------------------------------------------------------------------------------


def _chunked_logprobs_cuda() -> dict:
    """Chunked vs unchunked log-probs on CUDA, bf16 logits [4096, 151936]: max differences of
    values and gradients, and the peak memory of forward + backward of each."""
    import torch

    from megatron_longact.config.schema import ParallelConfig
    from megatron_longact.rl.chunked_logprobs import chunked_token_logprobs
    from megatron_longact.runtime.distributed import init_distributed, shutdown

    init_distributed(ParallelConfig(), seed=0)
    gen = torch.Generator(device="cuda").manual_seed(0)
    tokens, vocab = 4096, QWEN3_0P5B["vocab_size"]
    base = torch.randn(1, tokens, vocab, device="cuda", generator=gen).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (1, tokens), device="cuda", generator=gen)
    out = {}
    for chunk in (0, 512):
        logits = base.clone().requires_grad_(True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        logp, entropy = chunked_token_logprobs(logits, labels, temperature=1.0,
                                               chunk_tokens=chunk)  # fmt: skip
        logp.sum().backward()
        torch.cuda.synchronize()
        out[chunk] = (
            logp.detach(),
            entropy,
            logits.grad,
            torch.cuda.max_memory_allocated() - start,
        )
    shutdown()
    (logp0, ent0, grad0, peak0), (logp1, ent1, grad1, peak1) = out[0], out[512]
    return {
        "logp_max_diff": float((logp0 - logp1).abs().max()),
        "entropy_max_diff": float((ent0 - ent1).abs().max()),
        "grad_max_diff": float((grad0.float() - grad1.float()).abs().max()),
        "peak_gib_unchunked": peak0 / 2**30,
        "peak_gib_chunk512": peak1 / 2**30,
    }


def stage_rl_packing(work: Path) -> dict:
    chunked = _chunked_logprobs_cuda()
    hf = _write_hf_folder(work / "hf_0p5b", QWEN3_0P5B, seed=0, save_weights=False)
    out = _script("rl_step_padding.py", ["--hf-path", str(hf), "--max-seq-length", "2048",
                                         "--max-new-tokens", "512", "--samples", "16",
                                         "--steps", "2", "--warmup", "1"])  # fmt: skip
    wall = float(re.search(r"([0-9.]+)x by wall time", out).group(1))
    memory = float(re.search(r"peak memory ([0-9.]+)x", out).group(1))
    padding = [float(p) for p in re.findall(r"padding\s+([0-9.]+)%", out)]
    return {
        "figures": {**chunked, "throughput_ratio": wall, "peak_memory_ratio": memory,
                    "padding_pct_padded_packed": padding, "output": out[-1500:]},
        "checks": {
            "chunked_logp_equal": chunked["logp_max_diff"] <= 1e-5,
            "chunked_grad_equal": chunked["grad_max_diff"] <= 1e-5,
            "chunked_peak_lower": chunked["peak_gib_chunk512"] < chunked["peak_gib_unchunked"],
            "throughput_ratio_ge_1.5": wall >= 1.5,
            "peak_memory_ratio_le_1": memory <= 1.0,
        },
    }  # fmt: skip


def _env() -> dict:
    info = {"python": sys.version.split()[0]}
    try:
        import torch

        info.update(torch=torch.__version__, cuda=torch.version.cuda,
                    gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)  # fmt: skip
        import megatron.core

        info["megatron_core"] = megatron.core.__version__
    except Exception as err:  # the env block reports what is missing; stages then fail
        info["import_error"] = repr(err)
    return info


def _run_stage(stage: Stage, out: Path, *, timeout_s: float, log) -> dict:
    """Runs one stage in a child process; its result travels back through a JSON file."""
    result_file = out / f"{stage.name}.json"
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--stage", stage.name, "--out", str(out)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, timeout=timeout_s, capture_output=True, text=True)
        log.write(proc.stdout + proc.stderr)
        status = "ok" if proc.returncode == 0 else "failed"
        error = None if proc.returncode == 0 else (proc.stderr or proc.stdout)[-3000:]
    except subprocess.TimeoutExpired as err:
        log.write(f"{stage.name}: timed out after {timeout_s:.0f} s\n{err.stdout or ''}")
        status, error = "timeout", f"over {timeout_s:.0f} s"
    body = json.loads(result_file.read_text()) if result_file.exists() else {}
    if status == "ok" and not all(body.get("checks", {}).values()):
        status, error = "failed", f"checks failed: {body.get('checks')}"
    return {"status": status, "seconds": time.perf_counter() - start,
            "figures": body.get("figures", {}), "checks": body.get("checks", {}), "error": error}  # fmt: skip


def _child(name: str, out: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix=f"gpu_{name}_"))
    body = globals()[f"stage_{name}"](work)
    (out / f"{name}.json").write_text(json.dumps(body, indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON and the log")
    parser.add_argument("--dry-run", action="store_true", help="check arguments and schema only")
    parser.add_argument("--stages", default=",".join(STAGE_NAMES), help="comma-separated subset")
    parser.add_argument("--skip", default="", help="comma-separated stages to leave out")
    parser.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage's body
    args = parser.parse_args(argv)
    if args.stage:
        _child(args.stage, args.out)
        return 0
    skipped = [s for s in args.skip.split(",") if s]
    wanted = [s for s in args.stages.split(",") if s and s not in skipped]
    unknown = sorted((set(wanted) | set(skipped)) - set(STAGE_NAMES))
    if unknown:
        parser.error(f"--stages: unknown {unknown}; choose from {','.join(STAGE_NAMES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    if not os.access(args.out, os.W_OK):
        parser.error(f"--out {args.out} is not writable")
    result = result_skeleton(dry_run=args.dry_run)
    result["env"] = _env()
    start = time.perf_counter()
    with open(args.out / "gpu_check.log", "w") as log:
        for stage in STAGES:
            entry = result["stages"][stage.name]
            left = TOTAL_BUDGET_S - (time.perf_counter() - start)
            if args.dry_run or stage.name not in wanted:
                entry["status"] = "skipped"
                continue
            if left < 20:
                entry.update(status="skipped", error=f"only {left:.0f} s of the budget left")
                continue
            print(f"[gpu_check] {stage.name} (limit {min(stage.budget_s, left):.0f} s)", flush=True)
            entry.update(_run_stage(stage, args.out, timeout_s=min(stage.budget_s, left), log=log))
            print(f"[gpu_check] {stage.name}: {entry['status']} in {entry['seconds']:.0f} s "
                  f"{entry['figures'] if entry['status'] == 'ok' else entry['error']}", flush=True)  # fmt: skip
    result["total_s"] = time.perf_counter() - start
    validate_result(result)
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    failed = [n for n, s in result["stages"].items() if s["status"] in {"failed", "timeout"}]
    print(f"[gpu_check] {len(failed)} stage(s) failed {failed}; {args.out / 'gpu_check.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
