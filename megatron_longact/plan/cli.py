"""``longact plan``: check a parallel layout and estimate per-GPU memory before a job starts.

Examples::

    longact plan --model qwen3-8b --nodes 8 --tp 2 --cp 4 --seq-length 32768 \\
        --global-batch-size 128 --rollout-batch 4
    longact plan --config examples/longact_8b_rl.yaml --nodes 8 parallel.context_parallel_size=4

Flags win over ``--config`` values, which win over the defaults. Exit status 0 when the layout
is valid and fits, 1 (with the reason) otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from megatron_longact.config.schema import LOGPROB_CHUNK_TOKENS
from megatron_longact.errors import UserError
from megatron_longact.plan.from_config import ConfigInputs, load_plan_config, read_plan_inputs
from megatron_longact.plan.layout import Layout, LayoutError
from megatron_longact.plan.memory import (
    DEFAULT_GPU_MEM_GIB,
    DEFAULT_OVERHEAD_GIB,
    RECOMPUTE_CHOICES,
    MemoryEstimate,
    RolloutSpec,
    check_fits,
    estimate_memory,
    rollout_batch_per_replica,
)
from megatron_longact.plan.model_spec import (
    PRESETS,
    ModelSpec,
    count_parameters,
    get_preset,
    load_hf_config,
)

DEFAULT_GPUS_PER_NODE = 8


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longact plan",
        description="Check a TP/PP/CP/DP layout and estimate per-GPU memory (GiB).",
    )
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model", choices=sorted(PRESETS), help="a Qwen3 preset")
    model.add_argument("--hf-config", type=Path, help="a Hugging Face config.json (or its dir)")
    parser.add_argument("--config", type=Path, help="run config YAML (parallel/data/rl sections)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=DEFAULT_GPUS_PER_NODE)
    parser.add_argument("--tp", type=int, help="tensor_model_parallel_size")
    parser.add_argument("--pp", type=int, help="pipeline_model_parallel_size")
    parser.add_argument("--vpp", type=int,
                        help="virtual_pipeline_model_parallel_size (model chunks per PP stage)")  # fmt: skip
    parser.add_argument("--cp", type=int, help="context_parallel_size")
    parser.add_argument("--ep", type=int, help="expert_model_parallel_size (MoE models)")
    parser.add_argument(
        "--sequence-parallel",
        action=argparse.BooleanOptionalAction,
        help="megatron sequence parallel (default: parallel.sequence_parallel of --config, "
        "else on; only acts with TP > 1)",
    )
    parser.add_argument("--seq-length", type=int, help="tokens per (packed) sequence")
    parser.add_argument("--micro-batch-size", type=int)
    parser.add_argument("--global-batch-size", type=int, help="default: micro batch x DP")
    parser.add_argument("--recompute", choices=RECOMPUTE_CHOICES)
    parser.add_argument(
        "--rollout-batch",
        type=int,
        help="sequences each rollout replica (TP x PP group) generates at once; 0 = no rollout "
        "engine. Default from an RL config: rl.prompts_per_step x rl.rollouts_per_prompt spread "
        "over the replicas",
    )
    parser.add_argument("--rollout-tokens", type=int, help="tokens per rollout (default: seq)")
    parser.add_argument(
        "--rollout-mem-fraction",
        type=float,
        help="GPU memory fraction the rollout engine reserves for its KV pool (0: what it needs; "
        "default from an RL config with rl.engine=vllm: rl.vllm_memory_fraction, else 0)",
    )
    parser.add_argument(
        "--rollout-sleep",
        action="store_true",
        help="the engine frees its KV pool during the training step (vLLM sleep mode; implied "
        "by an RL config with rl.engine=vllm)",
    )
    parser.add_argument("--no-flash-attention", action="store_true")
    parser.add_argument(
        "--attention-backend",
        choices=["te", "local"],
        help="te: Transformer Engine (flash, ring CP); local: megatron's unfused attention and "
        "our all-gather CP attention (default: model.attention_backend of --config when local, "
        "else te)",
    )
    parser.add_argument("--gpu-mem-gib", type=float, default=DEFAULT_GPU_MEM_GIB)
    parser.add_argument(
        "--logprob-chunk-tokens",
        type=int,
        help="tokens per chunk of the RL policy step's log-prob pass, 0 unchunked (default: the "
        f"RL config's rl.logprob_chunk_tokens, else {LOGPROB_CHUNK_TOKENS})",
    )
    parser.add_argument("--overhead-gib", type=float, default=DEFAULT_OVERHEAD_GIB)
    parser.add_argument(
        "overrides", nargs="*", help="dotted config overrides, e.g. data.seq_length=16384"
    )
    return parser


def _resolve_model(args: argparse.Namespace, inputs: ConfigInputs) -> ModelSpec:
    if args.hf_config is not None:
        return load_hf_config(args.hf_config)
    if args.model is not None:
        return get_preset(args.model)
    if inputs.hf_config_path is not None:
        return load_hf_config(inputs.hf_config_path)
    if inputs.model_preset in PRESETS:
        return get_preset(inputs.model_preset)
    raise UserError(
        "no model to plan for: pass --model {" + ",".join(sorted(PRESETS)) + "} or --hf-config "
        "PATH (a config's model.hf_path is used when it holds a config.json)"
    )


def _pick(flag: object, from_config: object, default: object) -> object:
    if flag is not None:
        return flag
    return from_config if from_config is not None else default


def _count(params: int) -> str:
    return f"{params / 1e9:.2f}B" if params >= 1e8 else f"{params / 1e6:.2f}M"


def _render(
    spec: ModelSpec,
    layout: Layout,
    estimate: MemoryEstimate,
    *,
    recompute: str,
    gpu_mem_gib: float,
) -> Table:
    """The layout and the per-GPU memory breakdown as a table."""
    report = estimate.report
    table = Table(title=f"{spec.name}: {_count(count_parameters(spec))} parameters")
    table.add_column("item")
    table.add_column("value", justify="right")
    table.add_row(
        "layout",
        f"{layout.num_nodes}x{layout.gpus_per_node} GPUs = TP {layout.tensor_parallel_size} x PP "
        f"{layout.pipeline_parallel_size} x CP {layout.context_parallel_size} x DP "
        f"{report.data_parallel_size}",
    )
    if layout.pipeline_parallel_size > 1:
        vpp = layout.virtual_pipeline_parallel_size
        table.add_row(
            "pipeline bubble (PP-1)/(VPP x m)",
            f"{report.bubble_fraction:.1%}" + (f" (VPP {vpp})" if vpp > 1 else ""),
        )
    table.add_row("sequence parallel", "on" if layout.uses_sequence_parallel else "off")
    table.add_row(
        "sequence / per CP rank",
        f"{layout.seq_length} / {layout.seq_length // layout.context_parallel_size} tokens",
    )
    table.add_row(
        "batch (micro x DP x micro-batches)",
        f"{layout.micro_batch_size} x {report.data_parallel_size} x {report.num_microbatches} "
        f"= {layout.global_batch_size}",
    )
    table.add_row("recompute", recompute)
    table.add_row("params per GPU", f"{_count(estimate.params_per_gpu)} ({estimate.stage} stage)")
    for label, gib in (
        ("bf16 weights", estimate.weights_gib),
        ("fp32 grad buffer", estimate.grads_gib),
        (
            f"optimizer shards (/ DP x CP = {report.data_parallel_size * layout.context_parallel_size})",
            estimate.optimizer_gib,
        ),
        ("activations", estimate.activations_gib),
        ("logits", estimate.logits_gib),
        (
            "rollout KV cache" + (" (sleeps in training)" if estimate.rollout_sleeps else ""),
            estimate.rollout_kv_gib,
        ),
        ("overhead", estimate.overhead_gib),
    ):
        table.add_row(label, f"{gib:.2f} GiB")
    fits = estimate.total_gib <= gpu_mem_gib
    verdict = "[green]fits[/green]" if fits else "[red]does not fit[/red]"
    table.add_row("total per GPU", f"{estimate.total_gib:.2f} / {gpu_mem_gib:.0f} GiB {verdict}")
    return table


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``longact plan``; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    console = Console()
    errors = Console(stderr=True)
    try:
        if args.config is not None:
            inputs = read_plan_inputs(load_plan_config(args.config, args.overrides))
        elif args.overrides:
            raise UserError("dotted overrides need --config")
        else:
            inputs = ConfigInputs()
        spec = _resolve_model(args, inputs)
        seq_length = _pick(args.seq_length, inputs.seq_length, None)
        if seq_length is None:
            raise UserError(
                "no sequence length: pass --seq-length or a config with data.seq_length"
            )
        tp = _pick(args.tp, inputs.tensor_parallel_size, 1)
        pp = _pick(args.pp, inputs.pipeline_parallel_size, 1)
        cp = _pick(args.cp, inputs.context_parallel_size, 1)
        micro = _pick(args.micro_batch_size, inputs.micro_batch_size, 1)
        world = args.nodes * args.gpus_per_node
        default_global = micro * max(world // max(tp * pp * cp, 1), 1)
        layout = Layout(
            num_nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            tensor_parallel_size=tp,
            pipeline_parallel_size=pp,
            virtual_pipeline_parallel_size=_pick(
                args.vpp, inputs.virtual_pipeline_parallel_size, 1
            ),
            context_parallel_size=cp,
            expert_parallel_size=_pick(args.ep, inputs.expert_parallel_size, 1),
            sequence_parallel=_pick(args.sequence_parallel, inputs.sequence_parallel, True),
            seq_length=seq_length,
            micro_batch_size=micro,
            global_batch_size=_pick(
                args.global_batch_size, inputs.global_batch_size, default_global
            ),
        )
        recompute = _pick(args.recompute, inputs.recompute, "none")
        rollout_batch = args.rollout_batch
        if rollout_batch is None and inputs.generation_sequences:
            rollout_batch = rollout_batch_per_replica(
                inputs.generation_sequences, layout, max_batch=inputs.generation_batch_size
            )
        backend = args.attention_backend or (
            "local" if inputs.attention_backend == "local" else "te"
        )
        rollout = None
        if rollout_batch:
            rollout = RolloutSpec(
                batch=rollout_batch,
                max_tokens=args.rollout_tokens or seq_length,
                memory_fraction=_pick(
                    args.rollout_mem_fraction, inputs.rollout_memory_fraction, 0.0
                ),
                sleep=args.rollout_sleep or bool(inputs.rollout_sleep),
            )
        estimate = estimate_memory(
            spec,
            layout,
            recompute=recompute,
            rollout=rollout,
            flash_attention=not args.no_flash_attention,
            attention_backend=backend,
            rl_policy_step=bool(rollout_batch) or inputs.rollout_sequences is not None,
            logprob_chunk_tokens=_pick(
                args.logprob_chunk_tokens, inputs.logprob_chunk_tokens, LOGPROB_CHUNK_TOKENS
            ),
            overhead_gib=args.overhead_gib,
            gpu_mem_gib=args.gpu_mem_gib,
            enforce_budget=False,  # print the breakdown first, then fail below
        )
        console.print(
            _render(spec, layout, estimate, recompute=recompute, gpu_mem_gib=args.gpu_mem_gib)
        )
        for warning in estimate.report.warnings:
            console.print(f"[yellow]warning:[/yellow] {warning}")
        check_fits(estimate, gpu_mem_gib=args.gpu_mem_gib, recompute=recompute)
    except (ValueError, FileNotFoundError) as err:  # LayoutError is a ValueError
        kind = "bad layout" if isinstance(err, LayoutError) else "error"
        errors.print(f"[red]{kind}:[/red] {err}", highlight=False, soft_wrap=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
