"""Chunked log-probs and entropy: values and gradients equal the unchunked computation
(megatron's vocab-parallel cross entropy and the entropy formula), at TP=1 and TP=2, and the
peak memory of a policy step at a large vocabulary falls with the chunk size."""

from __future__ import annotations

import pytest
import torch

from megatron_longact.runtime.launch import run_local

TOKENS, VOCAB = 37, 96


def _reference(logits, labels, temperature):
    """The unchunked path: megatron's vocab-parallel CE and the three-all-reduce entropy."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    logp = -vocab_parallel_cross_entropy(logits.float() / temperature, labels)
    group = parallel_state.get_tensor_model_parallel_group()
    with torch.no_grad():
        scaled = logits.float() / temperature
        peak = scaled.max(dim=-1).values
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
        shifted = scaled - peak[..., None]
        exp = shifted.exp()
        sums = torch.stack([exp.sum(-1), (exp * shifted).sum(-1)])
        dist.all_reduce(sums, group=group)
        entropy = sums[0].log() - sums[1] / sums[0]
    return logp, entropy


def _compare(tp: int, dtype_name: str):
    from megatron.core import parallel_state

    from megatron_longact.config.schema import ParallelConfig
    from megatron_longact.rl.chunked_logprobs import chunked_token_logprobs
    from megatron_longact.runtime.distributed import init_distributed

    init_distributed(ParallelConfig(tensor_model_parallel_size=tp), seed=0)
    rank = parallel_state.get_tensor_model_parallel_rank()
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(0)
    full = (3 * torch.randn(2, TOKENS, VOCAB, generator=gen)).to(dtype)
    labels = torch.randint(0, VOCAB, (2, TOKENS), generator=gen)
    weights = torch.randn(2, TOKENS, generator=gen)
    part = VOCAB // tp
    shard = full[..., rank * part : (rank + 1) * part]
    out = {}
    for chunk in (0, 1, 5, 16, 10_000):
        logits = shard.clone().requires_grad_(True)
        if chunk == 0:
            logp, entropy = _reference(logits, labels, 0.7)
        else:
            logp, entropy = chunked_token_logprobs(logits, labels, temperature=0.7,
                                                   chunk_tokens=chunk)  # fmt: skip
        (logp * weights).sum().backward()
        out[chunk] = (logp.detach(), entropy, logits.grad)
    return out


@pytest.mark.parametrize("tp,dtype", [(1, "float32"), (2, "float32"), (1, "bfloat16")])
def test_chunked_equals_unchunked_values_and_gradients(tp, dtype):
    for result in run_local(_compare, tp, tp, dtype):
        ref_logp, ref_entropy, ref_grad = result.pop(0)
        for chunk, (logp, entropy, grad) in result.items():
            # Rows never interact and each chunk does megatron's ops in megatron's order.
            torch.testing.assert_close(logp, ref_logp, rtol=0, atol=0, msg=f"chunk {chunk}")
            torch.testing.assert_close(entropy, ref_entropy, rtol=0, atol=0)
            torch.testing.assert_close(grad, ref_grad, rtol=0, atol=0, msg=f"chunk {chunk}")


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in KiB."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _peak_bytes_per_element(chunk: int) -> float:
    """Peak resident memory of a log-prob forward + backward above its inputs, per logit
    element, in a fresh process (big tensors are mmap'd and returned on free). The high-water
    mark is reset first (``clear_refs`` 5, Linux >= 4.0, proc(5)), so an earlier transient
    peak (imports, the inputs' creation) cannot hide this one."""
    from megatron_longact.config.schema import ParallelConfig
    from megatron_longact.rl.chunked_logprobs import chunked_token_logprobs
    from megatron_longact.runtime.distributed import init_distributed

    init_distributed(ParallelConfig(), seed=0)
    tokens, vocab = 1024, 32768  # a 128 MiB fp32 [tokens, vocab] logits tensor
    logits = torch.randn(1, tokens, vocab).requires_grad_(True)
    labels = torch.randint(0, vocab, (1, tokens))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    logp, _ = chunked_token_logprobs(logits, labels, temperature=1.0, chunk_tokens=chunk)
    logp.sum().backward()
    return (_status_kib("VmHWM") - before) * 1024 / (tokens * vocab)


def test_peak_memory_falls_with_the_chunk_size(monkeypatch):
    # A fixed mmap threshold (glibc mallopt(3), read at process start, so the spawned workers
    # get it): every MiB-sized buffer is mmap'd and unmapped on free. glibc's default raises the
    # threshold after the first such free, and later chunks then stay in the heap, which made
    # the RSS peak depend on the allocation history rather than on the chunk size.
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    peaks = {chunk: run_local(_peak_bytes_per_element, 1, chunk)[0] for chunk in (0, 256, 64)}
    # Unchunked: the fp32 gradient (4 B) + three fp32 temporaries (12 B, plan/memory.py);
    # chunked: the gradient + 12 B over the chunk's share of the tokens.
    # Measured: 12.3, 6.3 and 4.8 B per element.
    assert peaks[0] > 10.0
    assert peaks[256] < 0.6 * peaks[0]
    assert peaks[64] < peaks[256]
    assert peaks[64] < 4.0 + 12.0 * 64 / 1024 + 2.0  # 2 B of allocator slack
