"""Forward steps for the RL phases: log-probs (old policy / reference) and the policy loss.

Both read the micro-batches of ``rl/batch.py``, packed rows [1, T] or padded rows [b, L], cut
for this rank by ``runtime.forward.model_batch`` (THD ``packed_seq_params`` or a dense mask,
context-parallel chunks): the one place that decides the model's input layout. Logits stay
vocab-parallel across TP; log-probs and entropy come from :mod:`rl.chunked_logprobs`, over
chunks of ``rl.logprob_chunk_tokens`` tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from megatron_longact.rl.chunked_logprobs import chunked_token_logprobs
from megatron_longact.rl.correction import ROLLOUT_WEIGHTS
from megatron_longact.runtime.context_parallel import cp_rank, gather_sequence
from megatron_longact.runtime.forward import device_batch, model_batch


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float):
    """log pi(label) per position: logits [b, s, V/tp] (vocab-parallel) -> [b, s] fp32."""
    return chunked_token_logprobs(logits, labels, temperature=temperature)[0]


def _model_step(data_iterator, model):
    """This rank's cut of the next micro-batch and the model's logits [b, s, V/tp] on it."""
    batch, params = model_batch(device_batch(next(data_iterator)))
    kwargs = {} if params is None else {"packed_seq_params": params}
    logits = model(input_ids=batch["tokens"], position_ids=batch["position_ids"],
                   attention_mask=batch.get("attention_mask"), **kwargs)  # fmt: skip
    return batch, params, logits


def logprob_forward_step(temperature: float, *, chunk_tokens: int = 0) -> Callable:
    """forward_step_func whose report carries ``logp``, shaped as the micro-batch's
    ``tokens`` (forward-only use), whole on every CP rank like the rows it is stored next to."""

    def loss_func(batch, params, logits):
        logp, _ = chunked_token_logprobs(logits, batch["labels"], temperature=temperature,
                                         chunk_tokens=chunk_tokens)  # fmt: skip
        # THD only carries packed rows, [1, T]: the gathered row is the micro-batch's shape.
        whole = gather_sequence(logp, params)
        zero = logits.sum() * 0.0
        return zero, torch.tensor(1, dtype=torch.int), {"logp": whole.detach().cpu()}

    def step(data_iterator, model):
        batch, params, logits = _model_step(data_iterator, model)
        return logits, partial(loss_func, batch, params)

    return step


def _report(value: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.stack([value.detach().double() * weight, weight.double()])


def policy_forward_step(
    loss_fn: Callable, *, temperature: float, per_sequence: bool, chunk_tokens: int = 0
) -> Callable:
    """forward_step_func for a policy loss from ``rl/losses.py``.

    Returns (sum of per-token losses, token count) -- or (sum of per-sequence token means,
    sequence count) when ``per_sequence`` (GRPO's seq-mean-token-mean) -- so megatron's
    ``calculate_per_token_loss`` normalises by the global count. Reports: loss, the loss
    function's metrics and entropy, each as [weighted sum, weight]. A packed row's sequences
    are told apart by ``sequence_ids`` (their whole-sequence counts come from ``seq_tokens``).
    """

    def loss_func(batch, logits):
        logp, entropy = chunked_token_logprobs(logits, batch["labels"], temperature=temperature,
                                               chunk_tokens=chunk_tokens)  # fmt: skip
        mask = batch["response_mask"]
        extra = {"ref_logp": batch["ref_logp"]} if "ref_logp" in batch else {}
        if per_sequence:
            seq_tokens = batch["seq_tokens"]
            if "sequence_ids" in batch:  # each token's whole-sequence count, [b, s]
                ids = batch["sequence_ids"].clamp(min=0)
                seq_tokens = seq_tokens[ids] if seq_tokens.numel() else torch.zeros_like(mask)
            extra["sequence_token_counts"] = seq_tokens
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
        report = {
            "loss": torch.stack([loss.detach().double(), count.double()]),
            "entropy": _report((entropy * mask).sum() / tokens.clamp(min=1), tokens),
        }
        for name, value in metrics.items():
            report[name] = _report(value, tokens)
        return loss, count.to(torch.int), report

    def step(data_iterator, model):
        batch, _, logits = _model_step(data_iterator, model)
        return logits, partial(loss_func, batch)

    return step
