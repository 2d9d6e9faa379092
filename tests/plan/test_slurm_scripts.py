"""The Slurm launch scripts: syntax, shellcheck, and the stage machinery run locally.

The runs use ``LAUNCHER=local`` (torchrun on this host, no Slurm) and a stand-in CLI
(``fake_longact_cli.py``) that records its argv and torch.distributed environment, so the
tests check what each stage is started with, the stage markers, the skip on resubmission,
failure handling and the USR1 stop path through torchrun, in seconds.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SLURM_DIR = REPO / "launch" / "slurm"
SCRIPTS = sorted(SLURM_DIR.glob("*.sh"))
WAIT_LIMIT_S = 120.0

QWEN3_8B_CONFIG = {
    "model_type": "qwen3",
    "hidden_size": 4096,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 12288,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": False,
}


def test_scripts_exist():
    names = {path.name for path in SCRIPTS}
    assert {"common.sh", "longact_4b.sh", "longact_8b.sh", "longact_32b.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_bash_syntax(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck_clean():
    result = subprocess.run(
        ["shellcheck", "-x", "-P", "SCRIPTDIR/../..", *[str(path) for path in SCRIPTS]],
        capture_output=True,
        text=True,
        cwd=SLURM_DIR,
    )
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize(
    "script", [p for p in SCRIPTS if p.name != "common.sh"], ids=lambda p: p.name
)
def test_sbatch_header_is_requeue_safe(script):
    text = script.read_text()
    assert "#SBATCH --requeue" in text
    assert "#SBATCH --signal=B:USR1@120" in text
    assert "#SBATCH --open-mode=append" in text
    assert "longact_main" in text


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    logs = tmp_path / "logs"
    logs.mkdir(exist_ok=True)
    for name in ("sft.yaml", "rl.yaml"):
        (tmp_path / name).write_text(
            "data: {seq_length: 16384, micro_batch_size: 1, global_batch_size: 32}\n"
        )
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("SLURM_", "LONGACT_", "NCCL_", "PET_", "TORCHELASTIC_"))
    }
    env.update(
        PYTHON=sys.executable,
        PYTHONPATH=f"{Path(__file__).parent}{os.pathsep}{env.get('PYTHONPATH', '')}",
        LONGACT_CLI_MODULE="fake_longact_cli",
        FAKE_CLI_LOG_DIR=str(logs),
        OUTPUT_DIR=str(tmp_path / "out"),
        SFT_CONFIG=str(tmp_path / "sft.yaml"),
        RL_CONFIG=str(tmp_path / "rl.yaml"),
        MASTER_PORT=str(21000 + os.getpid() % 5000 * 3),
        LONGACT_DEVICE="cpu",
    )
    env.update(extra)
    return env


def _records(tmp_path: Path, stage: str) -> list[dict]:
    records = []
    for path in sorted((tmp_path / "logs").glob(f"{stage}.rank*.jsonl")):
        records += [json.loads(line) for line in path.read_text().splitlines()]
    return records


def _run(script: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SLURM_DIR / script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=WAIT_LIMIT_S,
    )


def test_cpu_run_all_stages_then_skip_on_resubmit(tmp_path):
    env = _env(tmp_path, LONGACT_EXTRA_OVERRIDES="train.seed=7 optim.lr=1e-3")
    result = _run("longact_8b.sh", env)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "stages").iterdir()) == [
        "data.done",
        "export.done",
        "rl.done",
        "sft.done",
    ]

    # Without DATA_DIR a CPU run first makes the synthetic data set, in one process.
    (data,) = _records(tmp_path, "data")
    assert data["argv"][:3] == ["data", "--out-dir", f"{out}/data"]
    assert data["argv"][3:5] == ["--context-tokens", "256"]  # the quickstart's data set
    sft, rl, export = (_records(tmp_path, stage) for stage in ("sft", "rl", "convert"))
    assert sorted(r["rank"] for r in sft) == [0, 1] and {r["world_size"] for r in sft} == {2}
    assert sorted(r["rank"] for r in rl) == [0, 1]
    assert len(export) == 1 and export[0]["world_size"] == 1
    assert {r["longact_device"] for r in sft + rl + export} == {"cpu"}
    # One rendezvous port per stage.
    assert len({sft[0]["master_port"], rl[0]["master_port"], export[0]["master_port"]}) == 3

    sft_argv, rl_argv, export_argv = sft[0]["argv"], rl[0]["argv"], export[0]["argv"]
    assert sft_argv[:3] == ["sft", "--config", env["SFT_CONFIG"]]
    assert f"checkpoint.save_dir={out}/sft/checkpoints" in sft_argv
    assert f"data.train_path={out}/data/sft_train.jsonl" in sft_argv
    assert f"data.val_path={out}/data/sft_val.jsonl" in sft_argv
    assert f"data.train_path={out}/data/rl_train.jsonl" in rl_argv
    assert f"data.val_path={out}/data/rl_val.jsonl" in rl_argv
    assert rl_argv[:3] == ["rl", "--config", env["RL_CONFIG"]]
    assert f"checkpoint.load_dir={out}/sft/checkpoints" in rl_argv
    assert f"checkpoint.save_dir={out}/rl/checkpoints" in rl_argv
    assert export_argv[0] == "convert"
    assert (
        " ".join(export_argv).count(
            f"--direction mcore2hf --load {out}/rl/checkpoints --out {out}/hf"
        )
        == 1
    )
    for argv in (sft_argv, rl_argv, export_argv):
        assert argv[-2:] == ["train.seed=7", "optim.lr=1e-3"]
    # CPU runs take the tiny configs as they are: no paper settings, no GPU layout.
    assert not any(arg.startswith(("optim.lr=2e-5", "parallel.")) for arg in sft_argv + rl_argv)

    again = _run("longact_8b.sh", env)
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("already done") == 4
    assert len(_records(tmp_path, "sft")) == 2  # nothing ran again


def test_gpu_mode_passes_paper_settings_layout_and_paths(tmp_path):
    model_dir = tmp_path / "Qwen3-8B-Base"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(QWEN3_8B_CONFIG))
    # Two processes stand in for 2 GPUs; the layout overrides are TP 2, no CP, and the planner
    # gets a large budget because one 8B replica on 2 GPUs is not meant to fit.
    env = _env(
        tmp_path,
        LONGACT_DEVICE="gpu",
        GPUS_PER_NODE="2",
        MODEL_PATH=str(model_dir),
        DATA_DIR="/data/longact",
        SFT_CP="1",
        RL_TP="2",
        RL_CP="1",
        RL_RECOMPUTE="full",
        GPU_MEM_GIB="1000",
    )
    result = _run("longact_8b.sh", env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("fits") == 2  # the planner preflight for SFT and RL
    sft_argv = _records(tmp_path, "sft")[0]["argv"]
    rl_argv = _records(tmp_path, "rl")[0]["argv"]
    export_argv = _records(tmp_path, "convert")[0]["argv"]
    for expected in (
        "parallel.tensor_model_parallel_size=2",
        "parallel.context_parallel_size=1",
        "parallel.sequence_parallel=true",
        "optim.lr=2e-5",
        "optim.warmup_ratio=0.03",
        "data.seq_length=16384",
        "train.train_steps=900",
        f"model.hf_path={model_dir}",
        "data.train_path=/data/longact/sft_train.jsonl",
        "data.val_path=/data/longact/sft_val.jsonl",
    ):
        assert expected in sft_argv, expected
    for expected in (
        "optim.lr=1e-6",
        "rl.max_seq_length=32768",
        "rl.prompts_per_step=8",
        "rl.rollouts_per_prompt=16",
        "rl.temperature=1.0",
        "rl.max_new_tokens=4096",
        "train.recompute=full",
    ):
        assert expected in rl_argv, expected
    # The recipe's rl.datasets and LongAct settings are kept (ablations stay ablations).
    assert not any(a.startswith(("data.train_path=", "longact.")) for a in rl_argv)
    assert "parallel.tensor_model_parallel_size=1" in export_argv
    assert _records(tmp_path, "sft")[0]["cuda_device_max_connections"] == "1"
    assert _records(tmp_path, "data") == []  # GPU runs never make synthetic data


def test_bad_layout_aborts_before_any_stage(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(QWEN3_8B_CONFIG))
    env = _env(
        tmp_path, LONGACT_DEVICE="gpu", GPUS_PER_NODE="8", MODEL_PATH=str(model_dir), RL_CP="3"
    )
    result = _run("longact_8b.sh", env)
    assert result.returncode == 1
    assert "not divisible by TP x PP x CP" in result.stderr
    assert "the rl layout does not work" in result.stderr
    assert _records(tmp_path, "sft") == []


def test_gpu_mode_requires_model_path(tmp_path):
    result = _run("longact_8b.sh", _env(tmp_path, LONGACT_DEVICE="gpu"))
    assert result.returncode == 1
    assert "set MODEL_PATH" in result.stderr


def test_failed_stage_stops_the_job_unmarked(tmp_path):
    result = _run("longact_4b.sh", _env(tmp_path, FAKE_CLI_FAIL="sft"))
    assert result.returncode == 1
    assert "stage sft failed" in result.stderr
    assert not (tmp_path / "out" / "stages" / "sft.done").exists()
    assert _records(tmp_path, "rl") == []


def test_usr1_forwards_to_workers_and_leaves_the_stage_unmarked(tmp_path):
    env = _env(tmp_path, FAKE_CLI_BLOCK="sft")
    process = subprocess.Popen(
        ["bash", str(SLURM_DIR / "longact_32b.sh")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    logs = tmp_path / "logs"
    deadline = time.monotonic() + WAIT_LIMIT_S
    while len(list(logs.glob("sft.rank*.ready"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(list(logs.glob("sft.rank*.ready"))) == 2, "workers never started"
    process.send_signal(signal.SIGUSR1)
    _, stderr = process.communicate(timeout=WAIT_LIMIT_S)
    assert process.returncode == 75, stderr  # stopped, to be resubmitted (no Slurm here)
    # torchrun passed USR1 on to both workers, which "checkpointed" and exited.
    assert sorted(p.name for p in logs.glob("*.usr1")) == ["sft.rank0.usr1", "sft.rank1.usr1"]
    assert not (tmp_path / "out" / "stages" / "sft.done").exists()
    assert _records(tmp_path, "rl") == []
    assert "stopped" in stderr


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("LONGACT_E2E") != "1",
    reason="minutes on CPU: set LONGACT_E2E=1 to run the launch script with the real CLI",
)
def test_cpu_pipeline_end_to_end_with_the_real_cli(tmp_path):
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("SLURM_", "LONGACT_", "PET_", "TORCHELASTIC_"))
    }
    # The quickstart configs, cut to a small data set and two steps per training stage.
    env.update(
        PYTHON=sys.executable,
        OUTPUT_DIR=str(tmp_path / "out"),
        MASTER_PORT=str(23000 + os.getpid() % 5000 * 3),
        LONGACT_DATA_ARGS="--context-tokens 256 --sft-train 32 --sft-val 8 --rl-train 64 --rl-val 8",
        LONGACT_EXTRA_OVERRIDES="train.train_steps=2 checkpoint.save_interval=1",
    )
    result = subprocess.run(
        ["bash", str(SLURM_DIR / "longact_cpu.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "stages").iterdir()) == [
        "data.done",
        "export.done",
        "rl.done",
        "sft.done",
    ]
    assert any((out / "sft" / "checkpoints").iterdir())
    assert any((out / "rl" / "checkpoints").iterdir())
    assert (out / "hf" / "config.json").is_file()
    assert list((out / "hf").glob("*.safetensors"))


def _build_launch(launcher: str, python: str, env: dict[str, str]) -> list[str]:
    """LONGACT_CMD from common.sh's longact_build_launch for a 2-node x 8-process step."""
    script = f"""
        set -euo pipefail
        source {SLURM_DIR / "common.sh"}
        LAUNCHER={launcher} PYTHON={python} LONGACT_CLI_MODULE=fake_longact_cli
        MASTER_ADDR=node-a MASTER_PORT=20000 LONGACT_SRUN_CONTAINER=(--container-image=img)
        longact_build_launch 2 8 1 rl --config 'my cfg.yaml' 'logging.note=a b'
        printf '%s\\0' "${{LONGACT_CMD[@]}}"
    """
    result = subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, check=True
    )
    return result.stdout.split("\0")[:-1]


def test_slurm_launchers_build_quoted_srun_steps(tmp_path):
    env = _env(tmp_path)
    torchrun = _build_launch("torchrun", "/bin/echo", env)
    assert torchrun[:7] == [
        "srun",
        "--container-image=img",
        "--nodes=2",
        "--ntasks=2",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
        "bash",
    ]
    # Each node's task expands its own SLURM_NODEID; arguments with spaces survive the quoting.
    echoed = subprocess.run(
        ["bash", "-c", torchrun[-1]],
        env={**env, "SLURM_NODEID": "1"},
        capture_output=True,
        text=True,
    ).stdout
    assert (
        "--nnodes=2 --nproc-per-node=8 --master-addr=node-a --master-port=20001 --node-rank=1"
        in echoed
    )
    assert echoed.strip().endswith("-m fake_longact_cli rl --config my cfg.yaml logging.note=a b")

    # srun launcher: one task per GPU, torch.distributed's env:// variables from Slurm's.
    per_gpu = _build_launch("srun", sys.executable, env)
    assert per_gpu[2:5] == ["--nodes=2", "--ntasks=16", "--ntasks-per-node=8"]
    slurm_task = {**env, "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NTASKS": "16"}
    subprocess.run(["bash", "-c", per_gpu[-1]], env=slurm_task, check=True)
    (record,) = _records(tmp_path, "rl")
    assert (record["rank"], record["local_rank"], record["world_size"]) == (9, 1, 16)
    assert record["master_port"] == "20001"
    assert record["argv"] == ["rl", "--config", "my cfg.yaml", "logging.note=a b"]
