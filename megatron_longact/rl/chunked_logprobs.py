"""Log-probs and entropy of vocab-parallel logits, computed over token chunks.

The RL passes need, per token, log pi(label) (with its gradient, for the policy loss) and the
entropy of softmax(logits / T) (a metric). Done on the whole [tokens, V/TP] logits at once, the
fp32 temporaries (the upcast and scaled logits, their exponentials, the softmax the cross
entropy saves for backward) are the largest activation of a long-context step: ~20 bytes per
logit element, 9 GiB per 32K tokens at Qwen3's 152K vocabulary over TP 2.

:func:`chunked_token_logprobs` keeps one chunk of ``chunk_tokens`` tokens of them alive at a
time. Forward saves only two fp32 numbers per token (the row max and the sum of exponentials,
after the TP all-reduces) and recomputes each chunk's softmax in backward, writing the logits
gradient chunk by chunk into one tensor of the logits' dtype. Per chunk the arithmetic is
op for op that of megatron's ``_VocabParallelCrossEntropy`` (``tensor_parallel/
cross_entropy.py`` ~20-140, megatron-core 0.16.1: upcast, max all-reduce, shift in place,
predicted logit, exp, sum all-reduce, log; backward softmax - one-hot times the upstream
gradient) and of the former ``vocab_parallel_entropy``, so values and gradients are those of
the unchunked computation, bit for bit on CPU, whatever the chunk size: rows never interact.

Collectives: every chunk does one MAX and one SUM all-reduce over the TP group in forward (none
in backward), so all TP ranks must call it with the same number of tokens.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _vocab_range(partition: int) -> tuple[int, int, object]:
    from megatron.core import parallel_state

    rank = parallel_state.get_tensor_model_parallel_rank()
    return (
        rank * partition,
        (rank + 1) * partition,
        parallel_state.get_tensor_model_parallel_group(),
    )


def _shifted_chunk(logits_2d, start, end, temperature, row_max=None):
    """fp32 ``logits / T`` of rows [start, end), minus the row max (all-reduced when not given)."""
    scaled = logits_2d[start:end].float() / temperature
    if row_max is None:
        row_max = scaled.max(dim=-1).values
        _, _, group = _vocab_range(logits_2d.shape[-1])
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    scaled -= row_max.unsqueeze(-1)
    return scaled, row_max


def _local_targets(labels: torch.Tensor, start_index: int, end_index: int):
    outside = (labels < start_index) | (labels >= end_index)
    local = labels.clone() - start_index
    local[outside] = 0
    return local, outside


class _ChunkedLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, temperature, chunk_tokens):
        partition = logits.shape[-1]
        start_index, end_index, group = _vocab_range(partition)
        logits_2d = logits.reshape(-1, partition)
        labels_1d = labels.reshape(-1)
        num_tokens = logits_2d.shape[0]
        chunk = num_tokens if chunk_tokens <= 0 else min(chunk_tokens, num_tokens)
        stats = torch.empty(2, num_tokens, dtype=torch.float32, device=logits.device)
        logp = torch.empty(num_tokens, dtype=torch.float32, device=logits.device)
        entropy = torch.empty_like(logp)
        for start in range(0, num_tokens, max(chunk, 1)):
            end = min(start + chunk, num_tokens)
            shifted, row_max = _shifted_chunk(logits_2d, start, end, temperature)
            local, outside = _local_targets(labels_1d[start:end], start_index, end_index)
            rows = torch.arange(end - start, device=logits.device)
            predicted = shifted[rows, local].clone()
            predicted[outside] = 0.0
            exp = torch.exp(shifted)
            # [predicted logit, sum exp, sum exp * shifted]: one SUM all-reduce for the three.
            sums = torch.stack([predicted, exp.sum(dim=-1), (exp * shifted).sum(dim=-1)])
            del exp, shifted
            dist.all_reduce(sums, group=group)
            logp[start:end] = -(torch.log(sums[1]) - sums[0])
            entropy[start:end] = sums[1].log() - sums[2] / sums[1]
            stats[0, start:end] = row_max
            stats[1, start:end] = sums[1]
        ctx.save_for_backward(logits, labels, stats)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.mark_non_differentiable(entropy)
        return logp.view(labels.shape), entropy.view(labels.shape)

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        logits, labels, stats = ctx.saved_tensors
        partition = logits.shape[-1]
        start_index, end_index, _ = _vocab_range(partition)
        logits_2d = logits.reshape(-1, partition)
        labels_1d = labels.reshape(-1)
        # d(-logp) flows into the cross entropy's backward, as in token_logprobs = -CE.
        upstream = -grad_logp.reshape(-1).float()
        grad = torch.empty_like(logits_2d)
        num_tokens = logits_2d.shape[0]
        for start in range(0, num_tokens, max(ctx.chunk, 1)):
            end = min(start + ctx.chunk, num_tokens)
            softmax, _ = _shifted_chunk(logits_2d, start, end, ctx.temperature,
                                        row_max=stats[0, start:end])  # fmt: skip
            torch.exp(softmax, out=softmax)
            softmax.div_(stats[1, start:end].unsqueeze(-1))
            local, outside = _local_targets(labels_1d[start:end], start_index, end_index)
            rows = torch.arange(end - start, device=logits.device)
            softmax[rows, local] -= 1.0 - outside.view(-1).float()
            softmax.mul_(upstream[start:end].unsqueeze(-1))
            grad[start:end] = softmax / ctx.temperature
        return grad.view_as(logits), None, None, None


def chunked_token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, *, temperature: float, chunk_tokens: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(label) and the entropy of softmax(logits / T), per token.

    Args:
        logits: [..., V/TP] vocab-parallel logits, any float dtype (the gradient comes back in
            it).
        labels: [...] int64 global token ids.
        temperature: T > 0, the sampling temperature.
        chunk_tokens: tokens per chunk; <= 0 computes all tokens in one chunk.

    Returns:
        ``(logp, entropy)``, each [...] fp32; only ``logp`` carries a gradient. Collective over
        the TP group (module docstring).
    """
    return _ChunkedLogProbs.apply(logits, labels, float(temperature), int(chunk_tokens))
