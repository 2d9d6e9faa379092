"""Full (TP-gathered) views of model parameters, for tests, logs and export."""

from __future__ import annotations

import torch
import torch.distributed as dist


@torch.no_grad()
def gather_tensor_parallel(param: torch.Tensor, *, gated: bool = False) -> torch.Tensor:
    """All-gathers a TP-sharded parameter along its ``partition_dim`` (a CPU fp32 copy).

    ``gated``: the parameter is a SwiGLU ``linear_fc1`` whose shards each hold
    [gate_shard; up_shard]; the result is reordered to the unsharded [gate; up].
    Non-sharded parameters are returned as they are. All TP ranks must call it.
    """
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return param.detach().float().cpu().clone()
    shards = [torch.empty_like(param) for _ in range(tp)]
    dist.all_gather(
        shards, param.detach().contiguous(), group=parallel_state.get_tensor_model_parallel_group()
    )
    if gated:
        halves = [shard.chunk(2, dim=0) for shard in shards]
        shards = [h[0] for h in halves] + [h[1] for h in halves]
    return torch.cat(shards, dim=param.partition_dim).float().cpu()


def full_named_parameters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{name: full tensor}`` for every parameter of ``module`` (names without wrappers).

    Names are local to this pipeline stage (megatron numbers layers per stage).
    """
    gated = bool(getattr(getattr(module, "config", None), "gated_linear_unit", False))
    result = {}
    for name, param in module.named_parameters():
        while name.startswith("module."):
            name = name[len("module.") :]
        is_fc1 = name.endswith("mlp.linear_fc1.weight")
        result[name] = gather_tensor_parallel(param, gated=gated and is_fc1)
    return result
