"""The Slurm jobs for real: ``sbatch launch/slurm/longact_8b.sh`` on a running Slurm cluster.

The job runs the real CLI (data -> SFT -> RL -> Hugging Face export) with gloo, two processes
through srun + torchrun, exactly as on a GPU cluster but for ``LONGACT_DEVICE=cpu``, and with
``MODEL_PATH`` an HF folder saved by transformers (tiny, random non-trivial weights), as a
cluster run has. The first test checks that the weights flowed HF -> SFT -> RL -> HF: SFT's
first loss is the HF model's loss on that batch, the RL stage (lr=0 there) starts from and
keeps the final SFT weights, so its first old log-probs are the SFT model's, and the exported
folder loads in transformers with the megatron RL checkpoint's logits. The second test stops the RL stage the way Slurm's time-limit warning
does (USR1 to the batch shell) and checks that the requeued job resumes where it stopped.

Needs ``sbatch`` and an idle node: ``bash .ci/slurm_setup.sh`` makes a one-node cluster on this
machine. Both tests together take about 3 minutes on 2 cores.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = "launch/slurm/longact_8b.sh"
JOB_LIMIT_S = 900
POLL_S = 2.0
# Slurm holds a requeued job for ~2 min (EligibleTime = requeue + 121 s); the test releases it.
REQUEUE_HOLD_REASON = "BeginTime"
REQUEUE_SETTLE_S = 20.0
TERMINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE", "PREEMPTED",
}  # fmt: skip
STAGES = ["data.done", "export.done", "rl.done", "sft.done"]
# A small synthetic set: the tiny model needs no more to run a few steps of each stage.
DATA_ARGS = "--context-tokens 96 --sft-train 64 --sft-val 8 --rl-train 32 --rl-val 8"


def _overrides(*, steps: int) -> str:
    """Dotted overrides for every stage (each stage's config has all sections).

    Two processes: data parallel 2, so 8 sequences = 2 x micro-batch 4. RL: 2 prompts x 4
    rollouts = 8 samples a step. Dynamic sampling off: the barely trained model gets the same
    reward on most groups, and a step that keeps no group writes no metrics.
    """
    return " ".join([
        f"train.train_steps={steps}", "checkpoint.save_interval=2", "logging.progress=false",
        "data.micro_batch_size=4", "data.global_batch_size=8",
        "rl.prompts_per_step=2", "rl.rollouts_per_prompt=4", "rl.max_new_tokens=24",
        "rl.dynamic_sampling=false",
    ])  # fmt: skip


def _no_slurm_reason() -> str | None:
    if shutil.which("sbatch") is None:
        return "sbatch not on PATH (bash .ci/slurm_setup.sh sets up a one-node Slurm)"
    try:
        # A node busy with another job still counts: the test's job waits in the queue.
        up = subprocess.run(
            ["sinfo", "--noheader", "--responding", "--states=idle,mixed,allocated,completing",
             "--format=%n"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"sinfo failed: {err}"
    if up.returncode != 0 or not up.stdout.strip():
        state = subprocess.run(["sinfo", "-N"], capture_output=True, text=True, timeout=30)
        return f"sinfo shows no node in service: {(state.stdout + state.stderr).strip()}"
    return None


_REASON = _no_slurm_reason()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.slurm,
    pytest.mark.skipif(_REASON is not None, reason=_REASON or ""),
]


class Job:
    """One submitted batch job: its id, output directory and log."""

    def __init__(self, tmp_path: Path, *, steps: int, model_path: Path, env_extra: dict):
        self.out = tmp_path / "out"
        self.log_pattern = tmp_path / "job-%j.out"
        # The job inherits this environment (sbatch --export=ALL); a Slurm or LongAct setting
        # of the shell that runs pytest must not leak into it.
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("SLURM_", "SBATCH_", "LONGACT_"))
        }
        env.update(
            LONGACT_DEVICE="cpu",
            GPUS_PER_NODE="2",
            OUTPUT_DIR=str(self.out),
            LONGACT_DATA_ARGS=DATA_ARGS,
            LONGACT_EXTRA_OVERRIDES=_overrides(steps=steps),
            MODEL_PATH=str(model_path),
            PYTHON=sys.executable,
            **env_extra,
        )
        # The 8B header asks for 8 nodes x 8 GPUs; the command line overrides it.
        submit = subprocess.run(
            ["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", "--time=15",
             f"--output={self.log_pattern}", SCRIPT],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert submit.returncode == 0, submit.stderr
        self.id = submit.stdout.strip().split(";")[0]
        self.log = Path(str(self.log_pattern).replace("%j", self.id))
        self.deadline = time.monotonic() + JOB_LIMIT_S

    def info(self) -> dict[str, str]:
        """``scontrol show job`` as a dict (finished jobs stay listed for MinJobAge)."""
        shown = subprocess.run(
            ["scontrol", "show", "job", "--oneliner", self.id],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        if shown.returncode != 0:
            return self._accounting()
        return dict(field.split("=", 1) for field in shown.stdout.split() if "=" in field)

    def _accounting(self) -> dict[str, str]:
        # Clusters with slurmdbd forget finished jobs sooner; sacct still knows them.
        row = subprocess.run(
            ["sacct", "--noheader", "--parsable2", "--allocations", "--jobs", self.id,
             "--format=State,Restart,ExitCode"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        fields = row.stdout.strip().splitlines()[0].split("|") if row.stdout.strip() else []
        if len(fields) != 3:
            return {"JobState": "UNKNOWN"}
        return {"JobState": fields[0].split()[0], "Restarts": fields[1], "ExitCode": fields[2]}

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_for(self, condition, what: str) -> dict[str, str]:
        """Polls until ``condition(info)`` holds; fails (cancelling the job) at the deadline."""
        while True:
            info = self.info()
            if condition(info):
                return info
            if time.monotonic() > self.deadline:
                self.cancel()
                pytest.fail(f"job {self.id}: no {what} in {JOB_LIMIT_S}s (state "
                            f"{info.get('JobState')}); log tail:\n{self.log_text()[-4000:]}")  # fmt: skip
            time.sleep(POLL_S)

    def wait_done(self) -> dict[str, str]:
        return self.wait_for(lambda info: info.get("JobState") in TERMINAL_STATES, "end")

    def cancel(self) -> None:
        subprocess.run(["scancel", self.id], capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory) -> Path:
    """MODEL_PATH: an HF folder saved by transformers (config, safetensors shards, tokenizer)."""
    from tiny_hf import save_tiny_hf_model

    return save_tiny_hf_model(tmp_path_factory.mktemp("model") / "tiny-qwen3", seed=5)


@pytest.fixture
def submit(tmp_path, hf_model):
    jobs: list[Job] = []

    def _submit(*, steps: int, **env_extra: str) -> Job:
        jobs.append(Job(tmp_path, steps=steps, model_path=hf_model, env_extra=env_extra))
        return jobs[-1]

    yield _submit
    for job in jobs:  # a failed assertion must not leave the node busy
        if job.info().get("JobState") not in TERMINAL_STATES:
            job.cancel()


def _assert_completed(job: Job, info: dict[str, str]) -> None:
    assert info.get("JobState") == "COMPLETED", (
        f"job {job.id} ended {info.get('JobState')} (exit {info.get('ExitCode')}); "
        f"log tail:\n{job.log_text()[-6000:]}"
    )


def _metric_steps(tensorboard_dir: Path) -> list[int]:
    """Steps in ``metrics.jsonl`` in file order; every logged loss must be finite."""
    records = [json.loads(line) for line in (tensorboard_dir / "metrics.jsonl").open()]
    for record in records:
        assert math.isfinite(record["train/loss"]), record
    return [record["step"] for record in records]


def _assert_latest(checkpoints: Path, step: int) -> None:
    latest = (checkpoints / "latest").read_text().strip()
    assert latest == f"iter_{step:07d}"
    assert (checkpoints / latest / "metadata.json").is_file()
    # A save that failed half way leaves its staging directory behind.
    assert not list(checkpoints.glob("*.tmp")), sorted(p.name for p in checkpoints.iterdir())


def _assert_hf_export(hf_dir: Path) -> None:
    from safetensors import safe_open

    config = json.loads((hf_dir / "config.json").read_text())
    shards = sorted(hf_dir.glob("*.safetensors"))
    assert shards, sorted(p.name for p in hf_dir.iterdir())
    shapes = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as tensors:
            shapes.update({name: tensors.get_slice(name).get_shape() for name in tensors.keys()})  # noqa: SIM118
    assert shapes["model.embed_tokens.weight"] == [config["vocab_size"], config["hidden_size"]]
    last = config["num_hidden_layers"] - 1
    assert f"model.layers.{last}.self_attn.q_proj.weight" in shapes


def _rl_config_at_lr0(tmp_path: Path) -> Path:
    """The CPU RL recipe at lr=0: the RL weights stay the weights RL started from."""
    import yaml

    recipe = yaml.safe_load((REPO / "examples" / "quickstart_rl_cpu.yaml").read_text())
    recipe["optim"].update(lr=0.0, min_lr=0.0)
    path = tmp_path / "rl_lr0.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def megatron_logits(*, hf_dir: str, ckpt: str, tokens: torch.Tensor) -> torch.Tensor:
    """One process: the megatron model of ``hf_dir``'s config with ``ckpt``'s weights,
    logits [b, s, V] on ``tokens`` (fp32)."""
    from megatron_longact.checkpoint import load_checkpoint
    from megatron_longact.config.schema import ModelConfig, ParallelConfig, TrainConfig
    from megatron_longact.models.gpt import build_gpt_model, make_transformer_config
    from megatron_longact.models.hf_config import parse_hf_config, read_hf_config
    from megatron_longact.runtime.distributed import init_distributed

    init_distributed(ParallelConfig(), seed=0)
    arch = parse_hf_config(read_hf_config(hf_dir))
    model_cfg = ModelConfig(hf_path=hf_dir)
    tconfig = make_transformer_config(arch, model=model_cfg, parallel=ParallelConfig(),
                                      train=TrainConfig(precision="fp32"))  # fmt: skip
    gpt = build_gpt_model(arch, tconfig, model=model_cfg)
    load_checkpoint(ckpt, model=[gpt], weights_only=True)
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return gpt.eval()(input_ids=tokens, position_ids=positions, attention_mask=None)


def _assert_weights_flowed(out: Path, hf_model: Path, tmp_path: Path) -> None:
    from tiny_hf import load_hf_tensors, transformers_sft_loss
    from transformers import AutoModelForCausalLM

    from megatron_longact.config import JobConfig, load_config
    from megatron_longact.convert.mcore_to_hf import export_checkpoint
    from megatron_longact.runtime.launch import run_local

    # HF -> SFT: the first SFT loss is the HF model's on the same batch.
    sft_ckpt = (
        out / "sft" / "checkpoints" / (out / "sft" / "checkpoints" / "latest").read_text().strip()
    )
    sft_job = load_config(JobConfig, str(sft_ckpt / "config.yaml"), [])
    assert sft_job.model.hf_path == str(hf_model)
    first = json.loads((out / "sft" / "tensorboard" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["train/loss"] == pytest.approx(transformers_sft_loss(hf_model, sft_job), abs=1e-5)

    # SFT -> RL: at lr=0 the RL weights are the weights RL started from; they equal the final
    # SFT weights, so RL's first old log-probs were computed by the final SFT model.
    sft_hf = tmp_path / "sft_hf"
    export_checkpoint(load=sft_ckpt, out_dir=sft_hf, hf_dir=hf_model, show_progress=False)
    sft_tensors, rl_tensors = load_hf_tensors(sft_hf), load_hf_tensors(out / "hf")
    source = load_hf_tensors(hf_model)
    assert sorted(rl_tensors) == sorted(sft_tensors)
    for name, tensor in sft_tensors.items():
        assert torch.equal(rl_tensors[name], tensor), f"{name}: RL did not start from SFT's"
    assert any(not torch.equal(t, source[n]) for n, t in sft_tensors.items())  # SFT trained

    # RL -> HF: transformers' logits of the exported folder are the megatron checkpoint's.
    tokens = torch.randint(0, 600, (2, 24), generator=torch.Generator().manual_seed(0))
    rl_ckpt = str(out / "rl" / "checkpoints")
    expected = run_local(megatron_logits, 1, hf_dir=str(hf_model), ckpt=rl_ckpt, tokens=tokens)[0]
    exported = AutoModelForCausalLM.from_pretrained(
        out / "hf", dtype=torch.float32, attn_implementation="eager"
    )
    with torch.no_grad():
        logits = exported(input_ids=tokens).logits
    torch.testing.assert_close(logits, expected[..., : logits.shape[-1]], atol=1e-4, rtol=0)


def test_sbatch_runs_all_stages(submit, hf_model, tmp_path):
    steps = 4
    job = submit(steps=steps, RL_CONFIG=str(_rl_config_at_lr0(tmp_path)))
    info = job.wait_done()
    _assert_completed(job, info)
    log = job.log_text()
    assert "launcher torchrun" in log and "device cpu" in log
    assert "all stages done" in log
    assert f"init: Hugging Face weights from {hf_model}" in log  # SFT
    assert "init: loaded weights of checkpoint" in log  # RL, from SFT's

    out = job.out
    assert sorted(p.name for p in (out / "stages").iterdir()) == STAGES
    for stage in ("sft", "rl"):
        _assert_latest(out / stage / "checkpoints", steps)
        assert _metric_steps(out / stage / "tensorboard") == list(range(1, steps + 1))
    _assert_hf_export(out / "hf")
    _assert_weights_flowed(out, hf_model, tmp_path)


def test_usr1_stops_rl_and_the_requeued_job_resumes(submit):
    steps = 12
    job = submit(steps=steps)
    rl_latest = job.out / "rl" / "checkpoints" / "latest"
    # First RL checkpoint at step 2 of 12: the stop lands mid-stage.
    job.wait_for(lambda info: rl_latest.exists() or info.get("JobState") in TERMINAL_STATES,
                 "first RL checkpoint")  # fmt: skip
    assert job.info().get("JobState") == "RUNNING", job.log_text()[-4000:]
    # What `#SBATCH --signal=B:USR1@120` does before the time limit.
    subprocess.run(["scancel", "--batch", "--signal=USR1", job.id], check=True, timeout=30)

    # While Slurm requeues, the job can show a terminal state (FAILED) for a moment before
    # Restarts counts up; only a terminal state that lasts means the requeue did not happen.
    terminal_since: list[float] = []

    def requeued(info):
        if int(info.get("Restarts", "0")) > 0:
            return True
        if info.get("JobState") not in TERMINAL_STATES:
            terminal_since.clear()
            return False
        terminal_since[:1] = terminal_since[:1] or [time.monotonic()]
        return time.monotonic() - terminal_since[0] > REQUEUE_SETTLE_S

    info = job.wait_for(requeued, "requeue")
    if info.get("JobState") == "PENDING" and info.get("Reason") == REQUEUE_HOLD_REASON:
        subprocess.run(["scontrol", "update", f"JobId={job.id}", "StartTime=now"],
                       check=True, timeout=30)  # fmt: skip
    info = job.wait_done()
    _assert_completed(job, info)
    assert int(info.get("Restarts", "0")) >= 1

    log = job.log_text()  # --open-mode=append: both runs in one file
    stop_part = log[log.find("USR1") :][:8000]  # what to show when the stop went wrong
    assert "USR1: time limit near" in log, log[-4000:]
    assert "received SIGUSR1" in stop_part, stop_part  # through srun and torchrun to the CLI
    assert "stopped after step" in stop_part, stop_part  # at a step boundary, checkpointed
    assert f"requeueing job {job.id}" in stop_part, stop_part
    assert f"job {job.id} restart 1," in log
    assert "init: resumed checkpoint" in log  # the requeued RL stage, from its save_dir
    for stage in ("data", "sft"):
        assert log.count(f"stage {stage}: done") == 1
        assert f"stage {stage}: already done" in log

    stages = job.out / "stages"
    assert sorted(p.name for p in stages.iterdir()) == STAGES
    assert "restart 0 " in (stages / "sft.done").read_text()
    assert "restart 1 " in (stages / "rl.done").read_text()
    # Resumed at the stop step's checkpoint: a restart from scratch or from an older
    # checkpoint would log some steps twice (metrics.jsonl is appended to).
    assert _metric_steps(job.out / "rl" / "tensorboard") == list(range(1, steps + 1))
    _assert_latest(job.out / "rl" / "checkpoints", steps)
    _assert_hf_export(job.out / "hf")
