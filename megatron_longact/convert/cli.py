"""``longact convert``: Hugging Face <-> megatron checkpoints.

    longact convert --direction hf2mcore --hf-dir Qwen3-8B --out ckpt/qwen3-8b --tp 2 --pp 2
    longact convert --direction mcore2hf --load runs/rl/checkpoints --out Qwen3-8B-longact

hf2mcore needs tp*pp processes (lcm(tp, etp*ep)*pp for MoE with --ep/--etp): under
torchrun/srun (WORLD_SIZE set) it uses the launcher's world, otherwise it spawns that many
local processes itself (gloo on CPU, nccl with GPUs).
mcore2hf is one process whatever the saved layout.
"""

from __future__ import annotations

import argparse
import os

from megatron_longact.convert.mcore_to_hf import DEFAULT_MAX_SHARD_SIZE
from megatron_longact.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longact convert", description="Hugging Face <-> megatron checkpoint conversion"
    )
    parser.add_argument("--direction", required=True, choices=["hf2mcore", "mcore2hf"])
    parser.add_argument(
        "--hf-dir",
        help="hf2mcore: the HF model folder to import. mcore2hf: the source model folder "
        "whose config.json (and tokenizer) to use; default: the one in the checkpoint's "
        "config.yaml",
    )
    parser.add_argument(
        "--load", help="mcore2hf: a checkpoint folder, or a save_dir holding 'latest'"
    )
    parser.add_argument("--out", required=True, help="folder to create (must be empty or new)")
    parser.add_argument("--tp", type=int, default=1, help="hf2mcore: tensor parallel size")
    parser.add_argument("--pp", type=int, default=1, help="hf2mcore: pipeline parallel size")
    parser.add_argument(
        "--ep", type=int, default=1, help="hf2mcore, MoE models: expert parallel size"
    )
    parser.add_argument(
        "--etp",
        type=int,
        default=None,
        help="hf2mcore, MoE models: expert tensor parallel size (default: --tp)",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="hf2mcore: stored dtype; auto keeps fp32/bf16 and widens fp16 to fp32",
    )
    parser.add_argument("--tokenizer", help="mcore2hf: tokenizer folder to copy into --out")
    parser.add_argument(
        "--max-shard-size",
        default=DEFAULT_MAX_SHARD_SIZE,
        help="mcore2hf: largest safetensors shard, e.g. 5GB, 500MB",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--config",
        help="a run's YAML recipe: mcore2hf takes model.hf_path and data.tokenizer_path from it "
        "(and from dotted overrides) when --hf-dir / --tokenizer are not given",
    )
    parser.add_argument("overrides", nargs="*", help="dotted overrides of --config")
    return parser


def _hf_to_mcore(args: argparse.Namespace) -> None:
    from megatron_longact.convert.hf_import import (
        check_out_dir,
        import_hf_checkpoint,
        import_world_size,
    )
    from megatron_longact.models.hf_weights.hf_to_mcore import inspect_hf_dir

    if args.hf_dir is None:
        raise SystemExit("longact convert: --direction hf2mcore needs --hf-dir")
    if min(args.tp, args.pp, args.ep, args.etp or 1) < 1:
        raise SystemExit("longact convert: --tp, --pp, --ep and --etp must be >= 1")
    kwargs = dict(
        hf_dir=args.hf_dir,
        out_dir=args.out,
        tp=args.tp,
        pp=args.pp,
        ep=args.ep,
        etp=args.etp,
        dtype=args.dtype,
        show_progress=not args.quiet,
    )
    if "WORLD_SIZE" in os.environ:  # under a launcher: this process is one rank of the import
        import_hf_checkpoint(**kwargs)
        from megatron_longact.runtime.distributed import shutdown

        shutdown()
        return
    # Check in this process first, so bad input fails before tp*pp processes start.
    arch = inspect_hf_dir(args.hf_dir).arch
    check_out_dir(args.out)
    for field in ("num_attention_heads", "num_query_groups"):
        if getattr(arch, field) % args.tp:
            raise UserError(
                f"--tp {args.tp} does not divide the model's {field}={getattr(arch, field)} "
                f"({args.hf_dir}/config.json); pick a --tp that divides both "
                f"num_attention_heads={arch.num_attention_heads} and "
                f"num_query_groups={arch.num_query_groups}"
            )
    if args.ep > 1 or args.etp is not None:
        from megatron_longact.config.schema import ParallelConfig
        from megatron_longact.models.moe import check_expert_layout

        check_expert_layout(
            arch,
            ParallelConfig(
                tensor_model_parallel_size=args.tp,
                expert_model_parallel_size=args.ep,
                expert_tensor_parallel_size=args.etp,
            ),
        )
    from megatron_longact.runtime.launch import run_local

    world = import_world_size(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp)
    run_local(import_hf_checkpoint, world, **kwargs)


def _mcore_to_hf(args: argparse.Namespace) -> None:
    from megatron_longact.convert.mcore_to_hf import export_checkpoint

    if args.load is None:
        raise SystemExit("longact convert: --direction mcore2hf needs --load")
    export_checkpoint(
        load=args.load,
        out_dir=args.out,
        hf_dir=args.hf_dir,
        tokenizer_dir=args.tokenizer,
        max_shard_size=args.max_shard_size,
        show_progress=not args.quiet,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code. Errors in the input raise with a fixing hint."""
    args = build_parser().parse_args(argv)
    if args.config is not None or args.overrides:
        from megatron_longact.config import JobConfig, load_config

        job = load_config(JobConfig, args.config, args.overrides)  # validates every key
        args.hf_dir = args.hf_dir or job.model.hf_path
        args.tokenizer = args.tokenizer or job.data.tokenizer_path
    if args.direction == "hf2mcore":
        _hf_to_mcore(args)
    else:
        _mcore_to_hf(args)
    print(f"wrote {args.out}")
    return 0
