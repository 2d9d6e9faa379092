"""LongAct under context parallel: CP=2 and TP=2 x CP=2 equal CP=1 on the same global batch.

For every strategy (massive, min, random, none), the every_n_steps + EMA schedule and freeze
mode: M after each step, the selected masks, losses and the parameters after 3 steps (within the
bound on Adam's amplification of rounding noise, tests/equivalence.py). Input:
padded rows, packed bins with block-causal masks, and packed bins as THD with micro-batch 2
(the forward step flattens them to [1, 2S] and cuts per segment; the meter must follow).
Then ``longact saliency`` (the profile path and the CLI) under CP and on THD.
"""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from equivalence import assert_params_close
from longact_helpers import LR, build, make_job
from longact_worlds import Observations, run_probes

from megatron_longact.data.chat import TokenizedSample
from megatron_longact.data.packing import fill_bin
from megatron_longact.runtime.launch import run_local

SEQ, MBS, STEPS = 32, 2, 3
BINS = [[10, 14], [32], [5, 7, 9], [20]]  # sample lengths per bin (each padded to 4 = 2 x CP)
CASES = {  # name: (overrides, input kind)
    "massive_padded": ([], "padded"),
    "massive_packed": ([], "packed"),
    "massive_thd": ([], "thd"),
    "min_thd": (["longact.strategy=min", "longact.selection_scope=global"], "thd"),
    "random": (["longact.strategy=random", "longact.targets=[q,k,v]", "longact.seed=5"],
               "padded"),
    "none": (["longact.strategy=none"], "thd"),
    "every_n_ema": (["longact.schedule=every_n_steps", "longact.every_n_steps=2",
                     "longact.ema_decay=0.5"], "packed"),
    "freeze_thd": (["longact.mode=freeze"], "thd"),
}  # fmt: skip


def batches(step: int, vocab: int, *, kind: str) -> list[dict[str, torch.Tensor]]:
    """The step's 2 micro-batches of 2 rows (every rank builds them all; DP = 1 here).

    ``padded``: one sample per row with a padded tail; ``packed``: bins of several samples
    with block-causal masks; ``thd``: the same bins without masks (THD). ``token_mask`` marks
    real tokens (what LongAct counts), as ``sft.data.bin_collate`` builds it.
    """
    from megatron_longact.sft.data import bin_collate, pad_to_multiple

    gen = torch.Generator().manual_seed(100 + step)
    bins = []
    for lengths in BINS if kind != "padded" else [[32], [20], [9], [27]]:
        samples = []
        for n in lengths:
            ids = torch.randint(0, vocab, (n,), generator=gen).tolist()
            sample = TokenizedSample(input_ids=ids, loss_mask=[1] * n)
            samples.append(pad_to_multiple(sample, 4, pad_token_id=0))
        bins.append(fill_bin(samples, seq_length=SEQ))
    collate = bin_collate(use_thd=kind == "thd")
    return [collate(bins[i : i + MBS]) for i in range(0, len(bins), MBS)]


def longact_run(overrides: list[str], kind: str, parallel: list[str]) -> dict:
    """``STEPS`` LongAct steps on ``kind`` input: per step the loss, grad norm, M and masks;
    then all full parameters."""
    from megatron_longact.longact import LongActController
    from megatron_longact.runtime.forward import lm_forward_step
    from megatron_longact.runtime.params import full_named_parameters
    from megatron_longact.runtime.train_step import train_step

    job = make_job([*parallel, *overrides])
    state = build(job)
    if kind == "thd" and state.dims.cp == 1:
        kind = "packed"  # megatron's local attention (CP=1 on CPU) takes masks, not THD
    controller = LongActController.from_train_state(job.longact, state)
    steps = []
    for step in range(STEPS):
        micro = batches(step, state.arch.vocab_size, kind=kind)
        result = train_step(state, forward_step_func=lm_forward_step,
                            data_iterator=controller.observe(iter(micro)),
                            num_microbatches=len(micro), seq_length=SEQ,
                            micro_batch_size=MBS)  # fmt: skip
        steps.append({"loss": result.loss, "grad_norm": result.grad_norm,
                      "saliency": controller.saliency, "selection": controller.selection})  # fmt: skip
    controller.close()
    return {"steps": steps, "params": full_named_parameters(state.model[0])}


def profile_run(parallel: list[str], kind: str) -> tuple:
    """measure_saliency on step 0's ``kind`` input (THD: micro-batch 2, flattened and cut per
    segment): (M, number of samples measured)."""
    from megatron_longact.longact.profile import measure_saliency

    state = build(make_job(parallel))
    micro = batches(0, state.arch.vocab_size, kind=kind)
    profile = measure_saliency(state, micro, micro_batch_size=MBS, seq_length=SEQ)
    return profile.saliency, profile.num_samples


def world(parallel: list[str], names: list[str], profiles: list[str]) -> dict:
    return run_probes({
        **{name: partial(longact_run, *CASES[name], parallel) for name in names},
        **{f"profile_{kind}": partial(profile_run, parallel, kind) for kind in profiles},
    })  # fmt: skip


CP2 = ["parallel.context_parallel_size=2"]
TP2_CP2 = [*CP2, "parallel.tensor_model_parallel_size=2"]
TP2_CP2_CASES = ["massive_thd", "min_thd", "random", "freeze_thd"]


@pytest.fixture(scope="module")
def cp1() -> Observations:
    # THD needs CP > 1 on CPU: the CP=1 reference of THD input is the packed bins with masks.
    return Observations(run_local(world, 1, [], list(CASES), ["packed", "padded"]))


@pytest.fixture(scope="module")
def cp2() -> Observations:
    return Observations(run_local(world, 2, CP2, list(CASES), ["thd", "packed", "padded"]))


@pytest.fixture(scope="module")
def tp2_cp2() -> Observations:
    return Observations(run_local(world, 4, TP2_CP2, TP2_CP2_CASES, []))


def _assert_same_run(got: dict, want: dict, *, where: str) -> None:
    for step, (have, ref) in enumerate(zip(got["steps"], want["steps"], strict=True)):
        at = f"{where} step {step}"
        assert have["loss"] == pytest.approx(ref["loss"], abs=2e-5), at
        assert have["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4), at
        assert have["saliency"].keys() == ref["saliency"].keys(), at
        # Step 0: the same weights. Later steps start from weights that differ by fp32
        # reduction-order noise amplified by Adam (~1e-5).
        tol = 1e-5 if step == 0 else 2e-4
        torch.testing.assert_close(have["saliency"], ref["saliency"], rtol=tol, atol=tol / 10,
                                   msg=lambda m, at=at: f"{at}: M {m}")  # fmt: skip
        torch.testing.assert_close(have["selection"], ref["selection"], rtol=0, atol=0,
                                   msg=lambda m, at=at: f"{at}: masks {m}")  # fmt: skip
    assert_params_close(got["params"], want["params"], lr=LR, step=STEPS)


def test_cp1_reference_is_not_vacuous(cp1):
    assert cp1["massive_thd"][0]["steps"][0]["saliency"]  # measured
    assert not cp1["none"][0]["steps"][0]["saliency"]


@pytest.mark.parametrize("name", CASES)
def test_cp2_longact_matches_cp1(cp1, cp2, name):
    (want,) = cp1[name]
    for rank, got in enumerate(cp2[name]):
        _assert_same_run(got, want, where=f"{name} CP rank {rank}")


@pytest.mark.slow
@pytest.mark.parametrize("name", TP2_CP2_CASES)
def test_tp2_cp2_longact_matches_cp1(cp1, tp2_cp2, name):
    (want,) = cp1[name]
    for rank, got in enumerate(tp2_cp2[name]):
        _assert_same_run(got, want, where=f"{name} rank {rank}")


# ---- longact saliency ---------------------------------------------------------------------


def test_profile_counts_real_samples_not_bins_or_pads(cp1):
    assert cp1["profile_packed"][0][1] == 7
    assert cp1["profile_padded"][0][1] == 4


@pytest.mark.parametrize("kind", ["thd", "packed", "padded"])
def test_longact_saliency_profile_under_cp_and_thd(cp1, cp2, kind):
    # THD: micro-batch 2, flattened and cut per segment; against the same bins with masks.
    ((want, num_want),) = cp1["profile_packed" if kind == "thd" else f"profile_{kind}"]
    for saliency, num in cp2[f"profile_{kind}"]:
        assert num == num_want
        torch.testing.assert_close(saliency, want, rtol=1e-5, atol=1e-6)


def cli_world(parallel: list[str], chat_path: str, path: str):
    """``longact saliency`` end to end (it initialises its own world): the file it wrote."""
    from megatron_longact.longact.cli import run_saliency
    from megatron_longact.longact.profile import load_saliency

    job = make_job([*parallel, f"data.train_path={chat_path}", "data.seq_length=64",
                    "data.micro_batch_size=2", "longact.profile_samples=5",
                    f"longact.static_saliency_path={path}"])  # fmt: skip
    run_saliency(job)
    profile = load_saliency(path)
    return profile.saliency, profile.num_samples


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    words = "the quick brown fox jumps over a lazy dog and runs far away".split()
    with open(path, "w") as handle:
        for i in range(6):
            text = " ".join(words[: 3 + 2 * i])
            messages = [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}]
            handle.write(json.dumps({"messages": messages}) + "\n")
    return str(path)


@pytest.mark.slow
def test_longact_saliency_cli_under_cp(chat_file, tmp_path):
    ref = run_local(cli_world, 1, [], chat_file, str(tmp_path / "cp1.safetensors"))[0]
    assert ref[1] == 5  # every sample, the ragged tail of the micro-batches of 2 included
    for saliency, num in run_local(cli_world, 2, CP2, chat_file, str(tmp_path / "cp2.safetensors")):
        assert num == ref[1]
        torch.testing.assert_close(saliency, ref[0], rtol=1e-5, atol=1e-6)
