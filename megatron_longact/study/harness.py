"""``longact study``: SFT once, then RL for every arm and seed; held-out accuracy and reward
curves, mean ± 95% CI per arm, one figure (paper Tables 1, 5, 6 as an ablation on any scale).

Held-out accuracy is measured inside every RL run (``rl.heldout``, ``rl.eval_interval``): the
mean over ``--num-samples`` samples per prompt at temperature 1 (mean@k) and a greedy answer,
scored with the training reward, at step 0 (the SFT model: every run starts there with the same
evaluation seed, so all runs report the same step-0 value) and every ``--eval-interval`` steps.
Sampled accuracy is the lens that moves at small scale; greedy accuracy does not rise there.
The tables and the figure are :mod:`megatron_longact.study.report`.

Every stage is a ``longact`` command in its own process (``--launcher`` prefixes it, e.g.
``"torchrun --nproc-per-node 8"`` on a GPU node), so the same command runs on a laptop and a
cluster. A stage whose output exists is skipped: a killed study resumes where it stopped.

Layout under ``--out``::

    sft/checkpoints, sft/tb                        the one SFT run
    rl/<arm>-s<seed>/{checkpoints,tb}              one RL run per arm and seed (tb/metrics.jsonl
                                                   holds the reward and held-out curves)
    study.json, study.md, study.png                the aggregate
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from megatron_longact.errors import UserError
from megatron_longact.study.report import (
    GREEDY_KEY,
    HELDOUT_KEY,
    HELDOUT_SE_KEY,
    REWARD_KEY,
    StudyResult,
    read_curves,
    write_report,
)

ARM_OVERRIDES = {
    "dense": ["longact.strategy=none"],
    "massive": ["longact.strategy=massive"],
    "min": ["longact.strategy=min"],
    "random": ["longact.strategy=random"],
    "massive-0.1": ["longact.strategy=massive", "longact.ratio=0.1"],
    "massive-0.3": ["longact.strategy=massive", "longact.ratio=0.3"],
    "massive-0.5": ["longact.strategy=massive", "longact.ratio=0.5"],
}
"""Dotted overrides that make each arm (dense = every Q/K row trains, no LongAct mask; massive,
min and random keep the RL config's longact.ratio; massive-<lambda> sets it, paper Table 6)."""
DEFAULT_ARMS = ("dense", "massive", "min", "random")
DONE_FILE = "done"
"""Written into a stage's folder when it finished, so a resumed study skips it."""
CLAIM_FILE = "claimed"
"""The pid of the driver training a run (:func:`claim`)."""


@dataclass(kw_only=True)
class StudyConfig:
    """Settings of ``longact study``."""

    sft_config: str
    """YAML of the SFT stage (e.g. examples/quickstart_cpu.yaml)."""
    rl_config: str
    """YAML of the RL stage; its longact.strategy is overridden per arm."""
    eval_data: str
    """RL JSONL of held-out key-value questions (``longact data`` writes rl_val.jsonl)."""
    out_dir: str
    """Everything goes under here."""
    arms: list[str] = field(default_factory=lambda: list(DEFAULT_ARMS))
    """Arms to compare (keys of :data:`ARM_OVERRIDES`)."""
    seeds: int = 3
    """RL seeds per arm: 1, 2, ... (see :func:`seed_overrides`)."""
    eval_interval: int = 25
    """Held-out evaluation every this many RL steps (``rl.eval_interval``), also at 0 and last."""
    num_samples: int = 8
    """Samples per held-out prompt (``eval.num_samples``): the mean@k of the table."""
    eval_prompts: int | None = None
    """Held-out prompts: the first N of ``eval_data`` (None: all)."""
    parallel: int = 1
    """RL runs at once (each its own process): >1 fills a many-core CPU machine."""
    overrides: list[str] = field(default_factory=list)
    """Dotted overrides for all stages (e.g. model.preset=tiny-qwen3)."""
    sft_overrides: list[str] = field(default_factory=list)
    """Extra dotted overrides for the SFT stage only."""
    rl_overrides: list[str] = field(default_factory=list)
    """Extra dotted overrides for the RL stages only."""
    eval_overrides: list[str] = field(default_factory=list)
    """Extra ``eval.*`` overrides of the held-out evaluation (e.g. eval.sample_temperature=0.7)."""
    launcher: str = ""
    """Command prefix for every stage (empty: run ``longact`` in one process)."""


def seed_overrides(seed: int) -> list[str]:
    """One seed for everything random in an RL run: init/dropout (train.seed), prompt order and
    rollout sampling (rl.seed), the random arm's draw (longact.seed). train.seed alone leaves
    the rollouts identical across seeds."""
    return [f"train.seed={seed}", f"rl.seed={seed}", f"longact.seed={seed}"]


def _run(command: list[str], *, log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"study: {shlex.join(command)}  (log: {log})", flush=True)
    start = time.time()
    with log.open("w") as handle:
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-5:])
        raise ValueError(f"stage failed (exit {result.returncode}), see {log}:\n{tail}")
    print(f"study: done in {time.time() - start:.0f} s", flush=True)


def _longact(config: StudyConfig, *args: str) -> list[str]:
    # torchrun and srun-wrapped python both accept "-m module".
    prefix = shlex.split(config.launcher) if config.launcher else [sys.executable]
    return [*prefix, "-m", "megatron_longact.cli", *args]


def _rl_command(config: StudyConfig, arm: str, seed: int, *, sft: Path, run: Path) -> list[str]:
    # Step 0 is the same SFT model under the same evaluation seed in every run: one run (the
    # first job) evaluates it, the others start at their first interval.
    first = (arm, seed) == (config.arms[0], 1)
    heldout = [
        f"rl.eval_interval={config.eval_interval}",
        f"rl.eval_at_start={str(first).lower()}",
        f"eval.synthetic_kv_path={config.eval_data}",
        f"eval.num_samples={config.num_samples}",
    ]
    if config.eval_prompts is not None:
        heldout.append(f"rl.eval_num_prompts={config.eval_prompts}")
    return _longact(config, "rl", "--config", config.rl_config, *config.overrides,
                    *config.rl_overrides, *ARM_OVERRIDES[arm], *seed_overrides(seed), *heldout,
                    *config.eval_overrides,
                    f"checkpoint.load_dir={sft / 'checkpoints'}",
                    f"checkpoint.save_dir={run / 'checkpoints'}",
                    f"logging.tensorboard_dir={run / 'tb'}")  # fmt: skip


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(run: Path) -> bool:
    """Whether this driver may train ``run``: no other live process holds its ``claimed`` file
    (a pid). Lets several drivers (one per node, or a second one on a busy machine) share one
    ``--out``; a claim of a dead process is taken over, so a killed study still resumes."""
    run.mkdir(parents=True, exist_ok=True)
    file = run / CLAIM_FILE
    if file.is_file():
        pid = int(file.read_text().strip() or 0)
        if pid not in (0, os.getpid()) and _alive(pid):
            return False
    file.write_text(f"{os.getpid()}\n")
    return True


def _train_rl(config: StudyConfig, arm: str, seed: int, *, sft: Path, run: Path) -> None:
    if not (run / DONE_FILE).is_file() and claim(run):
        _run(_rl_command(config, arm, seed, sft=sft, run=run), log=run / "rl.log")
        (run / DONE_FILE).write_text("")


def run_study(config: StudyConfig) -> StudyResult:
    """Runs (or resumes) every stage and writes the aggregate. Single driver process; RL runs
    go ``config.parallel`` at a time, seed-major (every arm's seed 1 first)."""
    bad = [a for a in config.arms if a not in ARM_OVERRIDES]
    if bad:
        raise UserError(f"--arms: {bad} not among {list(ARM_OVERRIDES)}")
    if config.seeds < 1 or config.parallel < 1 or config.eval_interval < 1:
        raise UserError("--seeds, --parallel and --eval-interval must be at least 1")
    out = Path(config.out_dir)
    sft = out / "sft"
    if not (sft / DONE_FILE).is_file():
        _run(_longact(config, "sft", "--config", config.sft_config, *config.overrides,
                      *config.sft_overrides,
                      f"checkpoint.save_dir={sft / 'checkpoints'}",
                      f"logging.tensorboard_dir={sft / 'tb'}"),  # fmt: skip
             log=sft / "sft.log")  # fmt: skip
        (sft / DONE_FILE).write_text("")
    jobs = [(arm, seed) for seed in range(1, config.seeds + 1) for arm in config.arms]
    with ThreadPoolExecutor(max_workers=config.parallel) as pool:
        futures = [
            pool.submit(_train_rl, config, arm, seed, sft=sft, run=out / "rl" / f"{arm}-s{seed}")
            for arm, seed in jobs
        ]
        for future in futures:
            future.result()
    result = collect(out, arms=config.arms, seeds=range(1, config.seeds + 1),
                     num_samples=config.num_samples)  # fmt: skip
    write_report(result, out=out, config=config)
    return result


def collect(out: Path, *, arms, seeds, num_samples: int = 8) -> StudyResult:
    """The finished runs' curves and final held-out scores under ``out/rl`` (missing runs are
    left out, so a partial study can be reported); ``num_samples`` is the k of pass@k."""
    result = StudyResult(sft_accuracy=float("nan"), accuracy={}, curves={})
    for arm in arms:
        for seed in seeds:
            metrics = out / "rl" / f"{arm}-s{seed}" / "tb" / "metrics.jsonl"
            if not (metrics.parent.parent / DONE_FILE).is_file():
                continue
            pass_key = f"heldout/pass@{num_samples}"
            curves = read_curves(metrics, [HELDOUT_KEY, REWARD_KEY, GREEDY_KEY, HELDOUT_SE_KEY,
                                           pass_key])  # fmt: skip
            heldout, greedy = curves[HELDOUT_KEY], curves[GREEDY_KEY]
            last = max(heldout)
            result.accuracy.setdefault(arm, {})[seed] = heldout[last]
            result.heldout.setdefault(arm, {})[seed] = heldout
            result.curves.setdefault(arm, {})[seed] = curves[REWARD_KEY]
            result.greedy.setdefault(arm, {})[seed] = greedy[last]
            result.eval_se.setdefault(arm, {})[seed] = curves[HELDOUT_SE_KEY][last]
            result.pass_at_k.setdefault(arm, {})[seed] = curves[pass_key].get(last, float("nan"))
            if 0 in heldout and result.sft_accuracy != result.sft_accuracy:  # step 0: the SFT model
                result.sft_accuracy = heldout[0]
                result.sft_greedy = greedy[0]
    if not result.accuracy:
        raise ValueError(f"{out / 'rl'}: no finished RL run to report")
    if result.sft_accuracy == result.sft_accuracy:  # runs that skipped step 0 start there too
        for per_seed in result.heldout.values():
            for curve in per_seed.values():
                curve.setdefault(0, result.sft_accuracy)
    return result


def main(argv: list[str] | None = None) -> int:
    """``longact study --sft-config A --rl-config B --eval-data C --out D [overrides]``."""
    parser = argparse.ArgumentParser(
        prog="longact study", description="SFT once, then RL per arm and seed; mean ± 95% CI"
    )
    parser.add_argument("--sft-config", required=True)
    parser.add_argument("--rl-config", required=True)
    parser.add_argument("--eval-data", required=True, help="held-out RL JSONL (rl_val.jsonl)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                        help=f"comma-separated, of {','.join(ARM_OVERRIDES)}")  # fmt: skip
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--eval-interval", type=int, default=25,
                        help="held-out evaluation every N RL steps, at 0 and the end")  # fmt: skip
    parser.add_argument("--num-samples", type=int, default=8, help="k of the held-out mean@k")
    parser.add_argument("--eval-prompts", type=int, default=None,
                        help="held-out prompts: the first N of --eval-data (all)")  # fmt: skip
    parser.add_argument("--parallel", type=int, default=1, help="RL runs at once")
    parser.add_argument("--report-only", action="store_true",
                        help="aggregate the finished runs; start nothing")  # fmt: skip
    parser.add_argument("--launcher", default="", help='e.g. "torchrun --nproc-per-node 8"')
    parser.add_argument("--sft-override", action="append", default=[],
                        help="dotted override for the SFT stage only (repeatable)")  # fmt: skip
    parser.add_argument("--rl-override", action="append", default=[],
                        help="dotted override for the RL stages only (repeatable)")  # fmt: skip
    parser.add_argument("--eval-override", action="append", default=[],
                        help="eval.* override of the held-out evaluation (repeatable)")  # fmt: skip
    parser.add_argument("overrides", nargs="*", help="dotted overrides for every stage")
    args = parser.parse_args(argv)
    for flag, path in (("--sft-config", args.sft_config), ("--rl-config", args.rl_config),
                       ("--eval-data", args.eval_data)):  # fmt: skip
        if not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path}: no such file")
    config = StudyConfig(
        sft_config=args.sft_config, rl_config=args.rl_config, eval_data=args.eval_data,
        out_dir=args.out, arms=[a.strip() for a in args.arms.split(",") if a.strip()],
        seeds=args.seeds, eval_interval=args.eval_interval, num_samples=args.num_samples,
        eval_prompts=args.eval_prompts, parallel=args.parallel, overrides=args.overrides,
        sft_overrides=args.sft_override, rl_overrides=args.rl_override,
        eval_overrides=args.eval_override, launcher=args.launcher,
    )  # fmt: skip
    if args.report_only:
        result = collect(Path(config.out_dir), arms=config.arms,
                         seeds=range(1, config.seeds + 1), num_samples=config.num_samples)  # fmt: skip
        write_report(result, out=Path(config.out_dir), config=config)
    else:
        run_study(config)
    return 0
