"""RL under context parallel: CP=2 and TP=2 x CP=2 equal CP=1 on the same rows.

DAPO (token-mean) and GRPO (seq-mean-token-mean with the k3 KL term): the old and reference
log-probs (computed under CP and gathered back to whole rows), the loss, the global token or
sequence count, every gradient (DDP all-reduced over DP x CP; no distributed optimizer, so
``main_grad`` is whole on every rank) and the parameters after the step (within the bound on
Adam's amplification of rounding noise, tests/equivalence.py).
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from equivalence import ADAM_EPS_OVERRIDE, assert_params_close, full_grads

from megatron_longact.runtime.launch import run_local

ROWS, LENGTH, MBS = 4, 24, 2  # LENGTH: a multiple of 2 x CP = 4
LR = 1e-4


def _rows(vocab: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(3, vocab, (ROWS, LENGTH), generator=gen)
    response_mask = torch.zeros(ROWS, LENGTH)
    for row in range(ROWS):  # ragged responses, some only in the first or last CP chunk
        start = int(torch.randint(2, 10, (1,), generator=gen))
        end = int(torch.randint(start + 1, LENGTH, (1,), generator=gen))
        response_mask[row, start:end] = 1.0
    advantages = torch.randn(ROWS, 1, generator=gen).expand(-1, LENGTH) * response_mask
    return {
        "tokens": tokens,
        "labels": torch.roll(tokens, -1, 1),
        "position_ids": torch.arange(LENGTH).expand(ROWS, -1).contiguous(),
        "response_mask": response_mask,
        "seq_tokens": response_mask.sum(dim=1),
        "token_mask": torch.ones(ROWS, LENGTH),
        "advantages": advantages,
        "old_logp_offset": 0.3 * torch.randn(ROWS, LENGTH, generator=gen),
    }


def rl_step(parallel: list[str], algorithm: str) -> dict:
    from megatron_longact.config import JobConfig, load_config
    from megatron_longact.rl.batch import split_rows
    from megatron_longact.rl.forward import policy_forward_step
    from megatron_longact.rl.logprobs import compute_logprobs
    from megatron_longact.rl.losses import get_loss_fn
    from megatron_longact.runtime.distributed import init_distributed
    from megatron_longact.runtime.params import full_named_parameters
    from megatron_longact.runtime.setup import setup_train_state
    from megatron_longact.runtime.train_step import train_step

    job = load_config(JobConfig, None, ["model.preset=micro-qwen3", f"optim.lr={LR}",
                                        ADAM_EPS_OVERRIDE, "optim.warmup_steps=0",
                                        "optim.clip_grad=0.0",
                                        "parallel.use_distributed_optimizer=false",
                                        *parallel])  # fmt: skip
    dims = init_distributed(job.parallel, seed=3)
    state = setup_train_state(job, dims)
    micro = split_rows(_rows(state.arch.vocab_size), MBS)
    logps = compute_logprobs(state.model, micro, temperature=1.0)
    for batch, logp in zip(micro, logps):
        offset = batch.pop("old_logp_offset")
        batch["old_logp"] = logp + offset
        if algorithm == "grpo":
            batch["ref_logp"] = logp - 0.5 * offset
    forward = policy_forward_step(
        partial(get_loss_fn(algorithm)), temperature=1.0, per_sequence=algorithm == "grpo"
    )
    result = train_step(state, forward_step_func=forward, data_iterator=iter(micro),
                        num_microbatches=len(micro), seq_length=LENGTH, micro_batch_size=MBS,
                        report_keys=("clip_frac_high", "clip_frac_low"))  # fmt: skip
    return {
        "logp": torch.cat(logps),
        "loss": result.loss,
        "count": result.num_tokens,
        "grad_norm": result.grad_norm,
        "clip_frac": result.extras["clip_frac_high"] + result.extras["clip_frac_low"],
        "grads": full_grads(state.model[0]),
        "params": full_named_parameters(state.model[0]),
    }


def _world(parallel: list[str]) -> dict:
    from megatron.core import parallel_state

    out = {}
    for algorithm in ("dapo", "grpo"):
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        out[algorithm] = rl_step(parallel, algorithm)
    return out


@pytest.fixture(scope="module")
def reference() -> dict:
    ref = run_local(_world, 1, [])[0]
    assert ref["dapo"]["count"] == int(_rows(1024)["response_mask"].sum())  # tokens
    assert ref["grpo"]["count"] == ROWS  # sequences
    assert ref["dapo"]["clip_frac"] > 0  # the clipped branch is exercised
    return ref


def _assert_same(ref: dict, got: dict) -> None:
    torch.testing.assert_close(got["logp"], ref["logp"], atol=2e-5, rtol=1e-5)
    assert got["count"] == ref["count"]
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6)
    assert got["clip_frac"] == pytest.approx(ref["clip_frac"], abs=1e-6)
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
    assert got["grads"].keys() == ref["grads"].keys()
    for name, grad in got["grads"].items():
        scale = float(ref["grads"][name].abs().max())
        torch.testing.assert_close(grad, ref["grads"][name], atol=1e-5 * max(scale, 1e-3),
                                   rtol=1e-4, msg=name)  # fmt: skip
    assert_params_close(got["params"], ref["params"], lr=LR, step=1)


@pytest.mark.parametrize("algorithm", ["dapo", "grpo"])
def test_cp2_rl_matches_cp1(reference, algorithm, cp2_results):
    for res in cp2_results:
        _assert_same(reference[algorithm], res[algorithm])


@pytest.fixture(scope="module")
def cp2_results() -> list[dict]:
    return run_local(_world, 2, ["parallel.context_parallel_size=2"])


@pytest.mark.slow
def test_tp2_cp2_rl_matches_cp1(reference):
    parallel = ["parallel.context_parallel_size=2", "parallel.tensor_model_parallel_size=2"]
    for res in run_local(_world, 4, parallel):
        for algorithm in ("dapo", "grpo"):
            _assert_same(reference[algorithm], res[algorithm])
