"""Virtual pipeline stages (interleaved 1F1B): PP=2 x VPP=2 trains like one process, resumes
exactly, and its checkpoints load at another VPP.

tiny-qwen3 has 4 layers, so each of the 2 ranks holds 2 chunks of one layer: rank 0 layers 0
and 2, rank 1 layers 1 and 3 (megatron's ``get_transformer_layer_offset``). 4 micro-batches
per step: the interleaved schedule needs a multiple of PP.
"""

from __future__ import annotations

import pytest
import torch
from equivalence import ADAM_EPS_OVERRIDE, assert_params_close

from megatron_longact.config import JobConfig, load_config
from megatron_longact.errors import UserError
from megatron_longact.runtime.launch import run_local

SEQ = 32
GLOBAL_BATCH = 4
MICRO = 1
STEPS = 3
LR = 1e-3
VPP_OVERRIDES = [
    "parallel.pipeline_model_parallel_size=2",
    "parallel.virtual_pipeline_model_parallel_size=2",
]


def _global_batch(step: int, vocab: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(300 + step)
    samples = []
    for _ in range(GLOBAL_BATCH):
        tokens = torch.randint(0, vocab, (SEQ,), generator=gen)
        samples.append({"tokens": tokens, "labels": torch.roll(tokens, -1),
                        "loss_mask": (torch.rand(SEQ, generator=gen) > 0.3).float(),
                        "position_ids": torch.arange(SEQ)})  # fmt: skip
    return samples


def _micro_batches(samples: list[dict]) -> list[dict[str, torch.Tensor]]:
    return [{k: torch.stack([s[k] for s in samples[i : i + MICRO]]) for k in samples[0]}
            for i in range(0, len(samples), MICRO)]  # fmt: skip


def _global_params(chunks: list) -> dict[str, torch.Tensor]:
    """Every parameter of this rank's chunks under its global name (layer numbers from
    megatron's own ``layer_number``; the tied output layer named as the embedding)."""
    from megatron_longact.models.gpt import unwrap_gpt
    from megatron_longact.runtime.params import full_named_parameters

    out = {}
    for chunk in chunks:
        layers = unwrap_gpt(chunk).decoder.layers
        offset = layers[0].layer_number - 1 if len(layers) else 0
        for name, value in full_named_parameters(chunk).items():
            if name == "output_layer.weight":
                name = "embedding.word_embeddings.weight"
            parts = name.split(".")
            if "layers" in parts:
                i = parts.index("layers") + 1
                parts[i] = str(int(parts[i]) + offset)
            out[".".join(parts)] = value
    return out


@torch.no_grad()
def _load_global(chunks: list, full: dict[str, torch.Tensor]) -> None:
    for chunk in chunks:
        names = list(_global_params([chunk]))
        for name, (_, param) in zip(names, chunk.named_parameters(), strict=True):
            param.copy_(full[name])


def _job(overrides: list[str]) -> JobConfig:
    return load_config(JobConfig, None, ["model.preset=tiny-qwen3", f"optim.lr={LR}",
                                         ADAM_EPS_OVERRIDE, "optim.warmup_steps=0",
                                         f"train.train_steps={STEPS}", *overrides])  # fmt: skip


def _train(overrides: list[str], init: dict | None = None, *, save_at: int = 0,
           resume: str | None = None, save_dir: str | None = None) -> dict:  # fmt: skip
    """STEPS steps of the same global batches (from ``init``'s weights when given); with
    ``save_at`` saves after that step into ``save_dir``; with ``resume`` loads that checkpoint
    (model, optimizer, scheduler, RNG) and runs the remaining steps."""
    from megatron_longact.checkpoint import load_checkpoint, save_checkpoint
    from megatron_longact.runtime.distributed import init_distributed
    from megatron_longact.runtime.forward import lm_forward_step
    from megatron_longact.runtime.setup import setup_train_state
    from megatron_longact.runtime.train_step import train_step

    job = _job(overrides)
    dims = init_distributed(job.parallel, seed=job.train.seed)
    state = setup_train_state(job, dims)
    initial = _global_params(state.model)
    if init is not None:
        _load_global(state.model, init)
        state.optimizer.reload_model_params()
    first = 0
    if resume is not None:
        first = load_checkpoint(resume, model=state.model, optimizer=state.optimizer,
                                scheduler=state.scheduler).step  # fmt: skip
    losses, params = {}, {}
    for step in range(first, STEPS):
        micro = _micro_batches(_global_batch(step, state.arch.vocab_size))
        result = train_step(state, forward_step_func=lm_forward_step, data_iterator=iter(micro),
                            num_microbatches=len(micro), seq_length=SEQ,
                            micro_batch_size=MICRO)  # fmt: skip
        losses[step + 1] = (result.loss, result.grad_norm)
        params[step + 1] = _global_params(state.model)
        if step + 1 == save_at:
            save_checkpoint(save_dir, step=step + 1, model=state.model, optimizer=state.optimizer,
                            scheduler=state.scheduler)  # fmt: skip
    from megatron_longact.models.gpt import unwrap_gpt

    layers = [unwrap_gpt(c).decoder.layers[0].layer_number for c in state.model]
    return {"losses": losses, "params": params, "initial": initial, "layers": layers,
            "num_chunks": len(state.model)}  # fmt: skip


@pytest.fixture(scope="module")
def reference():
    return run_local(_train, 1, [])[0]


def _assert_matches(reference: dict, results: list[dict], *, steps) -> None:
    covered = set()
    for res in results:
        for step in steps:
            (loss_ref, g_ref), (loss, g) = reference["losses"][step], res["losses"][step]
            assert loss == pytest.approx(loss_ref, abs=2e-5), step
            assert g == pytest.approx(g_ref, rel=1e-4), step
            have = res["params"][step]
            assert_params_close(have, {k: reference["params"][step][k] for k in have},
                                lr=LR, step=step)  # fmt: skip
            covered |= have.keys()
    # The ranks' chunks together hold (and were compared on) every parameter.
    assert covered == reference["params"][STEPS].keys()


@pytest.mark.slow  # a 1-rank and a 2-rank run of 3 steps (~85 s on 2 shared cores)
def test_pp2_vpp2_matches_one_process(reference):
    results = run_local(_train, 2, VPP_OVERRIDES, reference["initial"])
    # Interleaved: rank 0 holds layers 1 and 3 (megatron numbers from 1), rank 1 layers 2, 4.
    assert [r["layers"] for r in results] == [[1, 3], [2, 4]]
    assert [r["num_chunks"] for r in results] == [2, 2]
    losses = [reference["losses"][s][0] for s in range(1, STEPS + 1)]
    assert losses[-1] < losses[0]
    _assert_matches(reference, results, steps=range(1, STEPS + 1))


@pytest.mark.slow  # two 2-rank runs (~2 min on 2 shared cores)
def test_pp2_vpp2_resume_is_exact(reference, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    full = run_local(_train, 2, VPP_OVERRIDES, reference["initial"], save_at=2, save_dir=ckpt)
    resumed = run_local(_train, 2, VPP_OVERRIDES, resume=ckpt)
    for whole, part in zip(full, resumed, strict=True):
        assert list(part["losses"]) == [STEPS]
        assert part["losses"][STEPS] == whole["losses"][STEPS]  # bit for bit
        for name, value in part["params"][STEPS].items():
            assert torch.equal(value, whole["params"][STEPS][name]), name


def _load_weights(overrides: list[str], path: str) -> dict:
    from megatron_longact.checkpoint import load_checkpoint
    from megatron_longact.runtime.distributed import init_distributed
    from megatron_longact.runtime.setup import setup_train_state

    job = _job(overrides)
    state = setup_train_state(job, init_distributed(job.parallel, seed=7))
    load_checkpoint(path, model=state.model, optimizer=state.optimizer,
                    scheduler=state.scheduler)  # fmt: skip
    return _global_params(state.model)


@pytest.mark.slow  # two 2-rank runs
def test_vpp_checkpoint_loads_without_virtual_stages(reference, tmp_path):
    # Weights are saved under global layer numbers (chunk keys model0, model1 hold them), so
    # a PP=2 x VPP=2 save loads at PP=2 without virtual stages (optimizer restarts: warning).
    ckpt = str(tmp_path / "ckpt")
    saved = run_local(_train, 2, VPP_OVERRIDES, reference["initial"], save_at=1, save_dir=ckpt)
    loaded = run_local(_load_weights, 2, ["parallel.pipeline_model_parallel_size=2"], ckpt)
    want = {k: v for res in saved for k, v in res["params"][1].items()}
    have = {k: v for res in loaded for k, v in res.items()}
    assert have.keys() == want.keys()
    for name, value in have.items():
        assert torch.equal(value, want[name]), name


def test_bad_virtual_pipeline_layouts_are_one_line_errors():
    from megatron_longact.runtime.batches import check_virtual_pipeline_microbatches

    with pytest.raises(UserError, match="pipeline_model_parallel_size >= 2"):
        load_config(JobConfig, None, ["parallel.virtual_pipeline_model_parallel_size=2"])
    with pytest.raises(UserError, match="must be >= 1"):
        load_config(JobConfig, None, ["parallel.virtual_pipeline_model_parallel_size=0"])
    # VPP 1 is the plain schedule.
    job = load_config(JobConfig, None, ["parallel.virtual_pipeline_model_parallel_size=1"])
    assert job.parallel.virtual_pipeline_model_parallel_size is None
    assert job.parallel.num_model_chunks == 1
    for count in (1, 3, 5):  # fewer than PP, or not a multiple of it
        with pytest.raises(UserError, match="multiple of parallel.pipeline_model_parallel_size=2"):
            check_virtual_pipeline_microbatches(count, pp=2, vpp=2)
    check_virtual_pipeline_microbatches(4, pp=2, vpp=2)
    check_virtual_pipeline_microbatches(3, pp=2, vpp=1)


def test_layers_not_divisible_by_pp_times_vpp():
    from megatron_longact.models.gpt import load_architecture, make_transformer_config

    job = _job(["parallel.pipeline_model_parallel_size=2",
                "parallel.virtual_pipeline_model_parallel_size=4"])  # fmt: skip
    with pytest.raises(UserError, match="not divisible by .* = 8"):
        make_transformer_config(load_architecture(job.model), model=job.model,
                                parallel=job.parallel, train=job.train)  # fmt: skip


def test_rl_refuses_virtual_stages():
    from megatron_longact.config.schema import check_rl_batch

    with pytest.raises(UserError, match="SFT only"):
        check_rl_batch(_job(VPP_OVERRIDES), dp=1)


def _hf_start(overrides: list[str], hf_dir: str) -> dict:
    from megatron_longact.runtime.distributed import init_distributed
    from megatron_longact.runtime.setup import load_start_weights, setup_train_state

    job = _job([f"model.hf_path={hf_dir}", *overrides])
    state = setup_train_state(job, init_distributed(job.parallel, seed=11))
    load_start_weights(job, state)
    return _global_params(state.model)


@pytest.mark.slow  # a 1-rank and a 2-rank start
def test_hf_weights_stream_into_every_chunk(tmp_path):
    # Each chunk takes the HF layers of its global layer numbers (the converter's mapping).
    from tiny_hf import save_tiny_hf_model

    hf_dir = str(save_tiny_hf_model(tmp_path / "hf", preset_name="tiny-qwen3"))
    want = run_local(_hf_start, 1, [], hf_dir)[0]
    results = run_local(_hf_start, 2, VPP_OVERRIDES, hf_dir)
    have = {k: v for res in results for k, v in res.items()}
    assert have.keys() == want.keys()
    for name, value in have.items():
        assert torch.equal(value, want[name]), name


def _sft_run(overrides: list[str]) -> None:
    from megatron_longact.sft.loop import run_sft

    run_sft(load_config(JobConfig, None, overrides))


@pytest.mark.slow  # the SFT loop twice (1 and 2 ranks) from the same HF weights
def test_sft_loop_with_validation_matches_one_process(synthetic_data_dir, tmp_path):
    # The whole loop: HF start, packed bins, validation (forward-only interleaved schedule),
    # save; HF weights give both layouts the same start (megatron's random init would not).
    import json

    from tiny_hf import save_tiny_hf_model

    hf_dir = save_tiny_hf_model(tmp_path / "hf", preset_name="tiny-qwen3")

    def overrides(run: str, *extra: str) -> list[str]:
        return [f"model.hf_path={hf_dir}", f"data.tokenizer_path={hf_dir}",
                f"data.train_path={synthetic_data_dir / 'sft_train.jsonl'}",
                f"data.val_path={synthetic_data_dir / 'sft_val.jsonl'}",
                "data.seq_length=256", "data.micro_batch_size=1", "data.global_batch_size=4",
                f"optim.lr={LR}", ADAM_EPS_OVERRIDE, "optim.warmup_steps=0",
                "train.train_steps=2", "train.eval_interval=1", "train.eval_batches=1",
                f"checkpoint.save_dir={tmp_path / run / 'ckpt'}",
                f"logging.tensorboard_dir={tmp_path / run / 'tb'}", "logging.progress=false",
                *extra]  # fmt: skip

    def rows(run: str) -> dict[int, dict]:
        lines = (tmp_path / run / "tb" / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r for r in map(json.loads, lines)}

    run_local(_sft_run, 1, overrides("one"))
    run_local(_sft_run, 2, overrides("vpp", *VPP_OVERRIDES))
    one, vpp = rows("one"), rows("vpp")
    assert sorted(one) == sorted(vpp) and 2 in one
    assert {"train/loss", "train/grad_norm", "val/loss"} <= one[2].keys()
    for step, row in one.items():
        for key in ("train/loss", "train/grad_norm", "val/loss"):
            if key in row:
                assert vpp[step][key] == pytest.approx(row[key], rel=1e-5, abs=2e-5), (step, key)
