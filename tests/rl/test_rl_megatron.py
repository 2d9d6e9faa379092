"""RL losses on the real megatron stack: normalisation across micro-batches and DP ranks."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from equivalence import ADAM_EPS_OVERRIDE, assert_params_close

from megatron_longact.runtime.launch import run_local

ROWS, LENGTH = 8, 24
LR = 1e-4


def _rows(vocab: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(3, vocab, (ROWS, LENGTH), generator=gen)
    response_mask = torch.zeros(ROWS, LENGTH)
    for row in range(ROWS):  # ragged responses: different token counts per row
        start = int(torch.randint(4, 10, (1,), generator=gen))
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
        # A fixed "old policy" offset so that ratios differ from 1 and clipping engages.
        "old_logp_offset": 0.3 * torch.randn(ROWS, LENGTH, generator=gen),
    }


def _step(algorithm: str, micro_batch_size: int):
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
                                        "optim.clip_grad=0.0"])  # fmt: skip
    dims = init_distributed(job.parallel, seed=3)
    state = setup_train_state(job, dims)
    rows = _rows(state.arch.vocab_size)
    share = ROWS // dims.dp
    mine = {k: v[dims.dp_rank * share : (dims.dp_rank + 1) * share] for k, v in rows.items()}
    micro = split_rows(mine, micro_batch_size)
    for batch, logp in zip(micro, compute_logprobs(state.model, micro, temperature=1.0)):
        offset = batch.pop("old_logp_offset")
        batch["old_logp"] = logp + offset
        if algorithm == "grpo":  # exercise the k3 KL term to a reference policy too
            batch["ref_logp"] = logp - 0.5 * offset
    forward = policy_forward_step(
        partial(get_loss_fn(algorithm)), temperature=1.0, per_sequence=algorithm == "grpo"
    )
    result = train_step(state, forward_step_func=forward, data_iterator=iter(micro),
                        num_microbatches=len(micro), seq_length=LENGTH,
                        micro_batch_size=micro_batch_size,
                        report_keys=("clip_frac_high", "clip_frac_low"))  # fmt: skip
    return {
        "loss": result.loss,
        "grad_norm": result.grad_norm,
        "clip_frac": result.extras["clip_frac_high"] + result.extras["clip_frac_low"],
        "params": full_named_parameters(state.model[0]),
    }


@pytest.mark.parametrize("algorithm", ["dapo", "grpo"])
def test_two_microbatches_times_dp2_equal_one_big_batch(algorithm):
    (big,) = run_local(_step, 1, algorithm, ROWS)
    split = run_local(_step, 2, algorithm, ROWS // 4)  # DP=2 x 2 micro-batches each
    assert big["clip_frac"] > 0  # the clipped branch is exercised
    for res in split:
        assert res["loss"] == pytest.approx(big["loss"], rel=1e-5, abs=1e-7)
        assert res["grad_norm"] == pytest.approx(big["grad_norm"], rel=1e-4)
        # One Adam step: within the bound on its amplification of rounding noise
        # (tests/equivalence.py), the run's eps included.
        assert_params_close(res["params"], big["params"], lr=LR, step=1)
