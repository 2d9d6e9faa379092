"""Forward steps for the RL phases: log-probs (old policy / reference) and the policy loss.

Both read right-padded rows (see ``rl/batch.py``). Logits stay vocab-parallel across TP:
log-probs come from megatron's vocab-parallel cross entropy, entropy from three TP all-reduces.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from megatron_longact.rl.correction import ROLLOUT_WEIGHTS
from megatron_longact.runtime.context_parallel import (
    cp_rank,
    gather_dense_sequence,
    slice_dense_batch,
)
from megatron_longact.runtime.forward import device_batch


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float):
    """log pi(label) per position: logits [b, s, V/tp] (vocab-parallel) -> [b, s] fp32."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    return -vocab_parallel_cross_entropy(logits.float() / temperature, labels)


@torch.no_grad()
def vocab_parallel_entropy(logits: torch.Tensor, *, temperature: float) -> torch.Tensor:
    """Entropy of softmax(logits / T) per position, [b, s, V/tp] -> [b, s]; TP collective."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    scaled = logits.float() / temperature
    peak = scaled.max(dim=-1).values
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    shifted = scaled - peak[..., None]
    exp = shifted.exp()
    sums = torch.stack([exp.sum(-1), (exp * shifted).sum(-1)])
    dist.all_reduce(sums, group=group)
    return sums[0].log() - sums[1] / sums[0]


def _logits(batch, model):
    return model(input_ids=batch["tokens"], position_ids=batch["position_ids"],
                 attention_mask=None)  # fmt: skip


def logprob_forward_step(temperature: float) -> Callable:
    """forward_step_func whose report carries ``logp`` [b, s] (forward-only use)."""

    def loss_func(batch, logits):
        # Full [b, s] on every CP rank, like the rows it is stored next to.
        logp = gather_dense_sequence(
            token_logprobs(logits, batch["labels"], temperature=temperature)
        )
        zero = logits.sum() * 0.0
        return zero, torch.tensor(1, dtype=torch.int), {"logp": logp.detach().cpu()}

    def step(data_iterator, model):
        batch = slice_dense_batch(device_batch(next(data_iterator)))
        return _logits(batch, model), partial(loss_func, batch)

    return step


def _report(value: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.stack([value.detach().double() * weight, weight.double()])


def policy_forward_step(loss_fn: Callable, *, temperature: float, per_sequence: bool) -> Callable:
    """forward_step_func for a policy loss from ``rl/losses.py``.

    Returns (sum of per-token losses, token count) -- or (sum of per-sequence token means,
    sequence count) when ``per_sequence`` (GRPO's seq-mean-token-mean) -- so megatron's
    ``calculate_per_token_loss`` normalises by the global count. Reports: loss, the loss
    function's metrics and entropy, each as [weighted sum, weight].
    """

    def loss_func(batch, logits):
        logp = token_logprobs(logits, batch["labels"], temperature=temperature)
        mask = batch["response_mask"]
        extra = {"ref_logp": batch["ref_logp"]} if "ref_logp" in batch else {}
        if per_sequence:
            extra["sequence_token_counts"] = batch["seq_tokens"]
        if ROLLOUT_WEIGHTS in batch:  # rollout correction (rl.correction), when on
            extra["token_weights"] = batch[ROLLOUT_WEIGHTS]
        loss, metrics = loss_fn(
            logp,
            batch["old_logp"],
            batch["advantages"],
            mask,
            num_global_tokens=1.0,
            num_global_sequences=1.0,
            **extra,
        )
        tokens = mask.sum()
        if per_sequence:
            # Each sequence counts once over the CP group (megatron sums counts over DP x CP).
            count = (batch["seq_tokens"] > 0).sum() if cp_rank() == 0 else tokens * 0
        else:
            count = tokens
        entropy = vocab_parallel_entropy(logits.detach(), temperature=temperature)
        report = {
            "loss": torch.stack([loss.detach().double(), count.double()]),
            "entropy": _report((entropy * mask).sum() / tokens.clamp(min=1), tokens),
        }
        for name, value in metrics.items():
            report[name] = _report(value, tokens)
        return loss, count.to(torch.int), report

    def step(data_iterator, model):
        batch = slice_dense_batch(device_batch(next(data_iterator)))
        return _logits(batch, model), partial(loss_func, batch)

    return step
