"""SFT under context parallel: CP=2 and TP=2 x CP=2 equal CP=1 on the same global batch.

Losses, grad norms and every parameter after a few steps, for padded rows and for packed bins.
The CP=1 reference is megatron's local attention with block-causal masks; under CP the model
uses ``models/cp_attention.py``, fed either the same masks (sliced on their query dim) or THD
``packed_seq_params`` (per-segment zig-zag chunks, RoPE restarting per sample).
"""

from __future__ import annotations

import pytest
import torch
from equivalence import ADAM_EPS_OVERRIDE, assert_params_close

from megatron_longact.config import JobConfig, load_config
from megatron_longact.data.chat import TokenizedSample
from megatron_longact.data.packing import collate, fill_bin
from megatron_longact.runtime.launch import run_local

SEQ = 32
MBS = 2
STEPS = 3
PACKED = [[10, 14], [32], [5, 7, 9], [20]]  # sample lengths per bin (before padding to 4)
LR = 1e-3
BASE = ["model.preset=micro-qwen3", f"optim.lr={LR}", "optim.warmup_steps=0",
        f"train.train_steps={STEPS}", "model.attention_backend=local"]  # fmt: skip
FP32 = [ADAM_EPS_OVERRIDE]  # bounds how far Adam amplifies rounding noise (tests/equivalence.py)


def _sample(length: int, gen: torch.Generator, vocab: int) -> TokenizedSample:
    ids = torch.randint(0, vocab, (length,), generator=gen).tolist()
    mask = (torch.rand(length, generator=gen) > 0.3).long().tolist()
    return TokenizedSample(input_ids=ids, loss_mask=mask)


def global_batch(step: int, vocab: int, *, packed: bool, thd: bool, multiple: int = 4):
    """Micro-batches of one step (every rank builds all of them; DP is 1 here).

    ``packed``: bins of several samples, each padded to ``multiple`` tokens (2 x CP), as
    ``sft.data`` does; otherwise one sample per row. ``thd``: no dense mask (THD path).
    """
    from megatron_longact.sft.data import pad_to_multiple

    gen = torch.Generator().manual_seed(100 + step)
    bins = []
    for lengths in PACKED if packed else [[SEQ], [20], [9], [27]]:
        samples = [pad_to_multiple(_sample(n, gen, vocab), multiple, pad_token_id=0)
                   for n in lengths]  # fmt: skip
        bins.append(fill_bin(samples, seq_length=SEQ))
    return [collate(bins[i : i + MBS], with_attention_mask=not thd) for i in range(0, 4, MBS)]


def sft_run(overrides: list[str], *, packed: bool, thd: bool) -> dict:
    """STEPS train steps of lm_forward_step; losses, grad norms, full parameters per step."""
    from megatron_longact.runtime.distributed import init_distributed
    from megatron_longact.runtime.forward import lm_forward_step
    from megatron_longact.runtime.params import full_named_parameters
    from megatron_longact.runtime.setup import setup_train_state
    from megatron_longact.runtime.train_step import train_step

    job = load_config(JobConfig, None, [*BASE, *overrides])
    dims = init_distributed(job.parallel, seed=job.train.seed)
    state = setup_train_state(job, dims)
    initial = full_named_parameters(state.model[0])
    losses, params = [], []
    for step in range(STEPS):
        micro = global_batch(step, state.arch.vocab_size, packed=packed, thd=thd)
        result = train_step(state, forward_step_func=lm_forward_step, data_iterator=iter(micro),
                            num_microbatches=len(micro), seq_length=SEQ,
                            micro_batch_size=MBS)  # fmt: skip
        losses.append((result.loss, result.grad_norm, result.num_tokens))
        params.append(full_named_parameters(state.model[0]))
    return {"losses": losses, "initial": initial, "steps": params, "params": params[-1]}


def _world(overrides: list[str], cases: list[tuple[bool, bool]]) -> list[dict]:
    from megatron.core import parallel_state

    out = []
    for packed, thd in cases:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        out.append(sft_run([*FP32, *overrides], packed=packed, thd=thd))
    return out


def assert_same(ref: dict, got: dict, *, atol: float = 2e-5) -> None:
    """Same start; token counts, losses and grad norms at every step; parameters after step k
    within ``param_atol(steps=k)``, the bound on Adam's amplification of fp32 reduction-order
    noise (tests/equivalence.py; largest seen after 3 steps: 4.4e-7, TP=2 x CP=2, padded)."""
    assert len(ref["losses"]) == STEPS and ref["params"]
    for name, value in got["initial"].items():  # same start, so the comparison means something
        torch.testing.assert_close(value, ref["initial"][name], atol=0, rtol=0)
    for (loss_r, norm_r, count_r), (loss, norm, count) in zip(ref["losses"], got["losses"],
                                                              strict=True):  # fmt: skip
        assert count == count_r
        assert loss == pytest.approx(loss_r, abs=atol)
        assert norm == pytest.approx(norm_r, rel=1e-4)
    for step, (want, have) in enumerate(zip(ref["steps"], got["steps"], strict=True), start=1):
        assert_params_close(have, want, lr=LR, step=step)


@pytest.fixture(scope="module")
def reference():
    padded, packed = run_local(_world, 1, [], [(False, False), (True, False)])[0]
    assert padded["losses"][-1][0] < padded["losses"][0][0]
    return {"padded": padded, "packed": packed}


def test_cp2_matches_cp1(reference):
    results = run_local(_world, 2, ["parallel.context_parallel_size=2"],
                        [(False, False), (True, False), (True, True)])  # fmt: skip
    for padded, packed_mask, packed_thd in results:
        assert_same(reference["padded"], padded)
        assert_same(reference["packed"], packed_mask)
        assert_same(reference["packed"], packed_thd)


def test_tp2_cp2_matches_cp1(reference):
    overrides = ["parallel.context_parallel_size=2", "parallel.tensor_model_parallel_size=2"]
    results = run_local(_world, 4, overrides, [(False, False), (True, True)])
    for padded, packed_thd in results:
        assert_same(reference["padded"], padded)
        assert_same(reference["packed"], packed_thd)


def _bf16_world(overrides: list[str]) -> dict:
    return sft_run([*overrides, "train.precision=bf16"], packed=True, thd=bool(overrides))


def test_cp2_bf16_close_to_cp1_bf16():
    """bf16 weights and activations with fp32 masters (the GPU recipe's precision) under CP:
    THD at CP=2 against masks at CP=1 stays within bf16 rounding over 3 steps."""
    ref = run_local(_bf16_world, 1, [])[0]
    for got in run_local(_bf16_world, 2, ["parallel.context_parallel_size=2"]):
        for (loss_r, norm_r, count_r), (loss, norm, count) in zip(ref["losses"], got["losses"],
                                                                  strict=True):  # fmt: skip
            assert count == count_r
            assert loss == pytest.approx(loss_r, rel=5e-3)
            assert norm == pytest.approx(norm_r, rel=3e-2)
        for name, value in got["params"].items():
            torch.testing.assert_close(value, ref["params"][name], atol=2e-2, rtol=2e-2)
