"""TP=2, DP=2 and PP=2 give the same losses and parameters as one process on the same batch.

Losses and grad norms at every step; parameters after every step, within the bound on Adam's
amplification of fp32 reduction-order noise (tests/equivalence.py, whose eps the runs use).
"""

from __future__ import annotations

import pytest
import torch
from equivalence import ADAM_EPS_OVERRIDE, assert_params_close, global_name, load_full_stage

from megatron_longact.config import JobConfig, load_config
from megatron_longact.runtime.launch import run_local

SEQ = 32
GLOBAL_BATCH = 4
STEPS = 3
LR = 1e-3


def _global_batch(step: int, vocab: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(100 + step)
    samples = []
    for _ in range(GLOBAL_BATCH):
        tokens = torch.randint(0, vocab, (SEQ,), generator=gen)
        loss_mask = (torch.rand(SEQ, generator=gen) > 0.3).float()
        samples.append(
            {
                "tokens": tokens,
                "labels": torch.roll(tokens, -1),
                "loss_mask": loss_mask,
                "position_ids": torch.arange(SEQ),
            }
        )
    return samples


def _micro_batches(samples, *, dp_rank, dp, mbs):
    per_rank = len(samples) // dp
    mine = samples[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    return [
        {k: torch.stack([s[k] for s in mine[i : i + mbs]]) for k in mine[0]}
        for i in range(0, per_rank, mbs)
    ]


def _train(overrides: list[str], mbs: int, init: dict | None = None):
    from megatron_longact.runtime.distributed import init_distributed
    from megatron_longact.runtime.forward import lm_forward_step
    from megatron_longact.runtime.params import full_named_parameters
    from megatron_longact.runtime.setup import setup_train_state
    from megatron_longact.runtime.train_step import train_step

    job = load_config(
        JobConfig,
        None,
        [
            "model.preset=micro-qwen3",
            f"optim.lr={LR}",
            ADAM_EPS_OVERRIDE,
            "optim.warmup_steps=0",
            f"train.train_steps={STEPS}",
            *overrides,
        ],
    )
    dims = init_distributed(job.parallel, seed=job.train.seed)
    state = setup_train_state(job, dims)
    initial = full_named_parameters(state.model[0])
    if init is not None:
        layers_per_stage = state.arch.num_layers // dims.pp
        load_full_stage(state.model[0], init, layer_offset=dims.pp_rank * layers_per_stage)
    losses, params = [], []
    for step in range(STEPS):
        micro = _micro_batches(
            _global_batch(step, state.arch.vocab_size), dp_rank=dims.dp_rank, dp=dims.dp, mbs=mbs
        )
        result = train_step(
            state,
            forward_step_func=lm_forward_step,
            data_iterator=iter(micro),
            num_microbatches=len(micro),
            seq_length=SEQ,
            micro_batch_size=mbs,
        )
        losses.append((result.loss, result.grad_norm))
        params.append(full_named_parameters(state.model[0]))
    return {"losses": losses, "steps": params, "params": params[-1], "initial": initial,
            "pp_rank": dims.pp_rank}  # fmt: skip


@pytest.fixture(scope="module")
def reference():
    return run_local(_train, 1, [], 2)[0]


def _assert_params(ref: dict, res: dict, *, layer_offset: int | None = None) -> set[str]:
    """Parameters after each step within ``param_atol(steps=k)``; the names compared (global
    names when ``layer_offset`` maps a pipeline stage's)."""
    covered = set()
    for step, (want, have) in enumerate(zip(ref["steps"], res["steps"], strict=True), start=1):
        if layer_offset is not None:  # this stage's parameters, under their global names
            have = {global_name(k, layer_offset=layer_offset): v for k, v in have.items()}
            want = {k: want[k] for k in have}
        assert_params_close(have, want, lr=LR, step=step)
        covered |= have.keys()
    return covered


def _assert_same(ref, results, *, atol=2e-5):
    # Never vacuous: every rank reports every step, and the full parameter set.
    assert results and len(ref["losses"]) == STEPS and ref["params"]
    for res in results:
        for (loss_ref, g_ref), (loss, g) in zip(ref["losses"], res["losses"], strict=True):
            assert loss == pytest.approx(loss_ref, abs=atol)
            assert g == pytest.approx(g_ref, rel=1e-4)
        assert res["params"].keys() == ref["params"].keys()
        _assert_params(ref, res)


def test_losses_fall_and_differ_per_step(reference):
    losses = [loss for loss, _ in reference["losses"]]
    assert losses[-1] < losses[0]


def test_tensor_parallel_2_matches_single(reference):
    results = run_local(_train, 2, ["parallel.tensor_model_parallel_size=2"], 2)
    _assert_same(reference, results)


def test_data_parallel_2_with_microbatches_matches_single(reference):
    # DP=2 x 2 micro-batches of 1 vs one process with 2 micro-batches of 2.
    results = run_local(_train, 2, [], 1)
    _assert_same(reference, results)


def test_pipeline_parallel_2_matches_single(reference):
    # megatron draws each stage's init from its own RNG stream, so start both runs from the
    # reference's initial weights; 2 micro-batches of 2 as in the reference.
    results = run_local(
        _train, 2, ["parallel.pipeline_model_parallel_size=2"], 2, reference["initial"]
    )
    assert len(results) == 2
    covered = set()
    for res in results:
        for (loss_ref, g_ref), (loss, g) in zip(reference["losses"], res["losses"], strict=True):
            assert loss == pytest.approx(loss_ref, abs=2e-5)
            assert g == pytest.approx(g_ref, rel=1e-4)
        offset = res["pp_rank"] * 1  # micro-qwen3 has 2 layers: one per stage
        covered |= _assert_params(reference, res, layer_offset=offset)
    # The two stages together hold (and were compared on) every parameter.
    assert covered == reference["params"].keys()
