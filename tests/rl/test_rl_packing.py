"""Packed RL micro-batches equal padded ones, on the real megatron stack (gloo, CPU).

One RL policy update (``rl.step.step_micro_batches`` + ``policy_updates``: old log-probs, the
policy loss, LongAct's saliency M) on a fixed set of scored samples of ragged lengths, 11 of
them so that DP=2 gets a partial share (a dynamic-sampled step's kept groups need not divide).
Within each layout packed (THD rows, the default; and dense block-causal masks), packed with a
token budget, and padded rows give the same loss, gradients and M; every layout gives the same
as one process (the step's data does not depend on the layout). Tolerances: fp32, 1e-6 on the
loss.
"""

from __future__ import annotations

import pytest
import torch
from equivalence import full_grads, global_name, load_full_stage

from megatron_longact.runtime.launch import run_local

NUM_SAMPLES = 11
BASE = ["model.preset=micro-qwen3", "model.attention_backend=local", "optim.lr=1e-4",
        "optim.warmup_steps=0", "optim.clip_grad=0.0", "parallel.use_distributed_optimizer=false",
        "data.micro_batch_size=3", "longact.strategy=massive", "longact.ratio=0.3",
        "rl.logprob_chunk_tokens=7"]  # fmt: skip
CASES = {
    "padded": ["rl.packing=false"],
    "packed": ["rl.packing=true"],
    "budget": ["rl.packing=true", "rl.max_tokens_per_microbatch=40"],
}


def samples(seed: int = 0, num: int = NUM_SAMPLES) -> list:
    """Scored samples of ragged lengths (prompts 3-24, responses 1-16 tokens, one truncated
    and filtered) with random advantages and engine log-probs (used as old-policy offsets)."""
    from megatron_longact.rl.experience import Sample

    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(num):
        prompt = int(torch.randint(3, 25, (1,), generator=gen))
        response = int(torch.randint(1, 17, (1,), generator=gen))
        ids = torch.randint(3, 1000, (prompt + response,), generator=gen).tolist()
        out.append(Sample(prompt_ids=ids[:prompt], response_ids=ids[prompt:],
                          engine_logprobs=(0.3 * torch.randn(response, generator=gen)).tolist(),
                          reward=0.0, format_ok=True, answer_ok=False, truncated=i == 4,
                          advantage=float(torch.randn(1, generator=gen))))  # fmt: skip
    return out


def rl_update(
    overrides: list[str], *, mask: bool = False, num: int = NUM_SAMPLES, init: dict | None = None
) -> dict:
    """One update on :func:`samples`; loss, count, grad norm, gradients (this stage's, under
    one-process names), M, and the initial weights. ``mask``: packed rows with a dense
    block-causal mask instead of THD. ``init``: one process's initial weights, loaded first
    (pipeline stages initialise apart, ``equivalence.load_full_stage``)."""
    from dataclasses import replace

    from megatron_longact.config import JobConfig, load_config
    from megatron_longact.longact import LongActController
    from megatron_longact.rl.step import policy_updates, step_layout, step_micro_batches
    from megatron_longact.runtime.distributed import init_distributed
    from megatron_longact.runtime.params import full_named_parameters
    from megatron_longact.runtime.setup import setup_train_state

    job = load_config(JobConfig, None, [*BASE, *overrides])
    dims = init_distributed(job.parallel, seed=3)
    state = setup_train_state(job, dims)
    layer_offset = dims.pp_rank * state.arch.num_layers // dims.pp
    if init is not None:
        load_full_stage(state.model[0], init, layer_offset=layer_offset)
    initial = full_named_parameters(state.model[0])
    layout = step_layout(job, dims)
    if mask:
        layout = replace(layout, thd=False)
    controller = LongActController.from_train_state(job.longact, state)
    updates, plan = step_micro_batches(job, state, samples(num=num), pad_token_id=0,
                                       layout=layout)  # fmt: skip
    for batch in (b for u in updates for b in u):
        if "old_logp" in batch:  # a fixed offset per token so that ratios differ from 1
            batch["old_logp"] = batch["old_logp"] + batch["engine_logp"]
            if job.rl.kl_beta > 0:
                batch["ref_logp"] = batch["old_logp"] - 0.5 * batch["engine_logp"]
    result = policy_updates(job, state, updates, step=1, observe=controller.observe)
    out = {
        "loss": result.loss,
        "count": result.num_tokens,
        "grad_norm": result.grad_norm,
        "clip_frac": result.extras["clip_frac_high"] + result.extras["clip_frac_low"],
        "saliency": controller.saliency,
        "num_micro": [len(u) for u in updates],
        "imbalance": plan.imbalance,
        "grads": {global_name(name, layer_offset=layer_offset): grad
                  for name, grad in full_grads(state.model[0]).items()},
        "initial": initial,
    }  # fmt: skip
    controller.close()
    return out


def world(
    parallel: list[str], cases: list[tuple[str, str, bool]], init: dict | None = None
) -> dict:
    from megatron.core import parallel_state

    out = {}
    for algorithm, case, mask in cases:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        extra = ["rl.algorithm=grpo", "rl.kl_beta=0.01"] if algorithm == "grpo" else []
        out[(algorithm, case, mask)] = rl_update([*parallel, *CASES[case], *extra], mask=mask,
                                                 init=init)  # fmt: skip
    return out


def _assert_same(ref: dict, got: dict, *, where: str) -> None:
    assert got["count"] == ref["count"], where
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6, abs=1e-6), where
    assert got["clip_frac"] == pytest.approx(ref["clip_frac"], abs=1e-6), where
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5), where
    for name, grad in got.get("grads", {}).items():
        scale = float(ref["grads"][name].abs().max())
        torch.testing.assert_close(grad, ref["grads"][name], rtol=1e-5,
                                   atol=1e-6 * max(scale, 1e-3), msg=f"{where}: {name}")  # fmt: skip
    for layer, per in got["saliency"].items():
        for projection, values in per.items():
            torch.testing.assert_close(values, ref["saliency"][layer][projection], rtol=1e-6,
                                       atol=1e-7, msg=f"{where}: M {layer}.{projection}")  # fmt: skip


ALL = [(a, c, False) for a in ("dapo", "grpo") for c in CASES]
MASKED = [("dapo", "packed", True), ("grpo", "budget", True)]
"""Packed rows with a dense block-causal mask (megatron's local attention over the whole row)
instead of THD (per segment at CP=1, models.cp_attention.PackedDotProductAttention)."""


@pytest.fixture(scope="module")
def reference() -> dict:
    """One process: padded, packed (THD and masked) and token-budget updates of DAPO and GRPO."""
    ref = run_local(world, 1, [], [*ALL, *MASKED])[0]
    dapo = ref[("dapo", "padded", False)]
    assert dapo["clip_frac"] > 0  # the clipped branch is exercised
    assert ref[("dapo", "budget", False)]["num_micro"][0] > 1  # the budget split the batch
    return ref


@pytest.mark.parametrize("algorithm", ["dapo", "grpo"])
def test_packed_and_token_budget_equal_padded_one_process(reference, algorithm):
    want = reference[(algorithm, "padded", False)]
    for (name, case, mask), got in reference.items():
        if name == algorithm and case != "padded":
            _assert_same(want, got, where=f"{algorithm} {case}{' mask' if mask else ''}")


def _check_world(reference: dict, results: list[dict]) -> None:
    for rank, res in enumerate(results):
        for (algorithm, case, mask), got in res.items():
            where = f"rank {rank} {algorithm} {case}{' mask' if mask else ''}"
            _assert_same(reference[(algorithm, "padded", False)], got, where=where)


def test_cp2_packed_mask_and_thd_equal_one_process_padded(reference):
    _check_world(reference, run_local(world, 2, ["parallel.context_parallel_size=2"],
                                      [*ALL, *MASKED]))  # fmt: skip


@pytest.mark.slow
def test_dp2_partial_share_equals_one_process(reference):
    results = run_local(world, 2, [], ALL)
    _check_world(reference, results)
    # 11 samples over 2 ranks: balanced, and both ranks run the same number of micro-batches.
    for key, got in results[0].items():
        assert got["num_micro"] == results[1][key]["num_micro"]


@pytest.mark.slow
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2-sp"])
def test_tp2_equals_one_process(reference, sequence_parallel):
    # Sequence parallel on the local spec: megatron's local norm asserts it off
    # (transformer/torch_norm.py ~32), models/sp_norm.py's RMSNorm takes its place; rows are
    # padded to a multiple of TP for the sequence scatter (rl.batch.row_layout).
    parallel = ["parallel.tensor_model_parallel_size=2",
                f"parallel.sequence_parallel={str(sequence_parallel).lower()}"]  # fmt: skip
    _check_world(reference, run_local(world, 2, parallel, [*ALL, *MASKED]))


@pytest.mark.slow
def test_pp2_equals_one_process(reference):
    # From one process's weights: pipeline stages initialise apart (equivalence.load_full_stage;
    # without it the grad norm was ~0.5% off, the weights differing, not the norm). The grad
    # norm counts the tied embedding once: megatron marks the last stage's copy ``shared``
    # (language_module.py ~219-224) and leaves it out of the norm (optimizer.py ~136-162,
    # ``param_is_not_shared``, module.py ~25) after summing both copies' grads
    # (finalize_model_grads.py ``_allreduce_word_embedding_grads``); each stage's gradients
    # are compared under one-process names, the copy on the last stage included.
    init = reference[("dapo", "padded", False)]["initial"]
    results = run_local(world, 2, ["parallel.pipeline_model_parallel_size=2"], ALL, init)
    _check_world(reference, results)


def _one_sample(overrides: list[str]) -> dict:
    return rl_update(overrides, num=1)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["padded", "packed"])
def test_dp2_with_one_sample_runs_an_empty_micro_batch(case):
    """A partial batch smaller than DP: the second rank runs one all-padding micro-batch."""
    (want,) = run_local(_one_sample, 1, CASES[case])
    results = run_local(_one_sample, 2, CASES[case])
    for got in results:
        assert got["num_micro"] == [1]
        _assert_same(want, got, where=f"dp2 one sample {case}")
