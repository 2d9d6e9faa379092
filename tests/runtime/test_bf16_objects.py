"""``train.precision=bf16`` on CPU builds what a GPU run builds: Float16Module around the
GPTModel, bf16 model params, fp32 grad buffers (``param.main_grad``), the distributed
optimizer with fp32 master shards; gloo carries the bf16 collectives it needs."""

from __future__ import annotations

import torch

from megatron_longact.runtime.launch import run_local


def build_and_inspect(precision: str) -> dict:
    import torch.distributed as dist
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.transformer.module import Float16Module

    from megatron_longact.config import JobConfig, load_config
    from megatron_longact.runtime.distributed import init_distributed
    from megatron_longact.runtime.setup import setup_train_state

    job = load_config(JobConfig, None, ["model.preset=micro-qwen3",
                                        f"train.precision={precision}"])  # fmt: skip
    state = setup_train_state(job, init_distributed(job.parallel, seed=1))
    ddp = state.model[0]
    inners = getattr(state.optimizer, "chained_optimizers", [state.optimizer])
    # gloo: the bf16 collectives of DDP and the distributed optimizer (torch 2.13).
    x = torch.full((4,), float(dist.get_rank() + 1), dtype=torch.bfloat16)
    gathered = torch.empty(8, dtype=torch.bfloat16)
    dist.all_gather_into_tensor(gathered, x)
    reduced = x.clone()
    dist.all_reduce(reduced)
    scattered = torch.empty(2, dtype=torch.bfloat16)
    dist.reduce_scatter_tensor(scattered, x)
    return {
        "float16_module": isinstance(ddp.module, Float16Module),
        "distributed_optimizer": all(isinstance(o, DistributedOptimizer) for o in inners),
        "param_dtypes": {p.dtype for p in ddp.parameters()},
        "main_grad_dtypes": {p.main_grad.dtype for p in ddp.parameters()},
        "master_dtypes": {
            t.dtype
            for o in inners
            for groups in (o.shard_fp32_from_float16_groups, o.shard_fp32_groups)
            for group in groups
            for t in group
        },
        "num_float16_masters": sum(
            len(g) for o in inners for g in o.shard_fp32_from_float16_groups
        ),
        "collectives": (gathered.tolist(), reduced.tolist(), scattered.tolist()),
    }


def test_bf16_builds_float16_module_and_fp32_masters():
    for precision in ("bf16", "fp32"):
        result = run_local(build_and_inspect, 2, precision)[0]
        bf16 = precision == "bf16"
        assert result["float16_module"] is bf16
        assert result["distributed_optimizer"]
        assert result["param_dtypes"] == {torch.bfloat16 if bf16 else torch.float32}
        assert result["main_grad_dtypes"] == {torch.float32}
        assert result["master_dtypes"] == {torch.float32}
        assert (result["num_float16_masters"] > 0) is bf16  # fp32: masters are the params
        gathered, reduced, scattered = result["collectives"]
        assert gathered == [1.0] * 4 + [2.0] * 4
        assert reduced == [3.0] * 4 and scattered == [3.0] * 2
