"""The vLLM engine's pure parts: HF-layout tensors from a live megatron chunk (equal to the
converter's export), change detection and row deltas after a LongAct step, whole fused modules
per refit, the sampling and output conversion, seeds. The engine itself runs for real on CPU
in tests/rl/test_vllm_colocated.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from megatron_longact.rl.rollout.factory import rollout_seed
from megatron_longact.rl.rollout.refit import (
    ChangeTracker,
    RefitStats,
    apply_row_delta,
    changed_rows,
    row_delta,
    row_fingerprints,
    vllm_module,
)
from megatron_longact.rl.rollout.types import SamplingParams
from megatron_longact.rl.rollout.vllm_engine import (
    check_cpu_shm,
    check_tp_group,
    request_seed,
    to_rollout,
    vllm_sampling_kwargs,
    with_tied_head,
)
from megatron_longact.runtime.launch import run_local

try:
    import vllm  # noqa: F401

    HAS_VLLM = True
except ImportError:
    HAS_VLLM = False

SEQ, ROWS = 16, 4
LAYOUTS = {  # name: overrides; each runs in the same 2-process world
    "dp2": [],
    "tp2": ["parallel.tensor_model_parallel_size=2"],
    "pp2": ["parallel.pipeline_model_parallel_size=2"],
}


def _batches(vocab: int, *, dp_rank: int, dp: int) -> list[dict]:
    gen = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, vocab, (ROWS, SEQ), generator=gen)
    rows = range(dp_rank * ROWS // dp, (dp_rank + 1) * ROWS // dp)
    return [
        {
            "tokens": tokens[r : r + 1],
            "labels": torch.roll(tokens[r : r + 1], -1, 1),
            "loss_mask": torch.ones(1, SEQ),
            "token_mask": torch.ones(1, SEQ),
            "position_ids": torch.arange(SEQ)[None],
            # megatron's default causal mask is built on CUDA; give the CPU path its own.
            "attention_mask": ~torch.ones(SEQ, SEQ, dtype=torch.bool).tril()[None, None],
        }
        for r in rows
    ]


def _hf_snapshot(state) -> dict[str, torch.Tensor]:
    from megatron_longact.rl.rollout.refit import iter_hf_tensors_from_model

    return {
        name: t.detach().cpu().clone()
        for name, t in iter_hf_tensors_from_model(state.model, arch=state.arch)
    }


def _layout_case(overrides: list[str], ckpt_dir: str) -> dict:
    """Iterator output before/after one LongAct (freeze) step, what the tracker sent, and the
    selected rows; saves the initial weights to ``ckpt_dir`` for the converter's export."""
    from megatron.core import parallel_state

    from megatron_longact.checkpoint import save_checkpoint
    from megatron_longact.config import JobConfig, load_config
    from megatron_longact.config.loader import to_yaml
    from megatron_longact.longact.controller import LongActController
    from megatron_longact.rl.rollout.refit import iter_hf_tensors_from_model
    from megatron_longact.runtime.distributed import init_distributed
    from megatron_longact.runtime.forward import lm_forward_step
    from megatron_longact.runtime.setup import setup_train_state
    from megatron_longact.runtime.train_step import train_step

    job = load_config(JobConfig, None, ["model.preset=micro-qwen3", "optim.lr=1e-2",
                                        "optim.warmup_steps=0", "longact.mode=freeze",
                                        *overrides])  # fmt: skip
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    dims = init_distributed(job.parallel, seed=5)
    state = setup_train_state(job, dims)
    save_checkpoint(ckpt_dir, step=0, model=state.model, config_yaml=to_yaml(job))
    tracker = ChangeTracker()

    def sent() -> list[str]:  # what a refit would send now
        return [n for n, _ in tracker.changed(iter_hf_tensors_from_model(state.model, arch=arch))]

    arch = state.arch
    before = _hf_snapshot(state)
    first, again = sent(), sent()

    controller = LongActController.from_train_state(job.longact, state)
    micro = _batches(state.arch.vocab_size, dp_rank=dims.dp_rank, dp=dims.dp)
    train_step(state, forward_step_func=lm_forward_step,
               data_iterator=controller.observe(iter(micro)), num_microbatches=len(micro),
               seq_length=SEQ, micro_batch_size=1)  # fmt: skip
    after = _hf_snapshot(state)
    rows = {}
    for name, tensor in iter_hf_tensors_from_model(state.model, arch=state.arch):
        rows[name] = tracker.diff(name, tensor)
    selection = {n: {p: m.cpu() for p, m in per.items()} for n, per in controller.selection.items()}
    controller.close()
    return {"before": before, "after": after, "first": first, "again": again, "rows": rows,
            "selection": selection, "vocab": state.arch.vocab_size}  # fmt: skip


def _world(root: str) -> dict:
    return {name: _layout_case(o, f"{root}/{name}") for name, o in LAYOUTS.items()}


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """{layout: [rank results]} and {layout: HF export of the saved initial weights}."""
    from megatron_longact.convert.mcore_to_hf import export_checkpoint

    root = tmp_path_factory.mktemp("refit")
    results = run_local(_world, 2, str(root))
    exports = {}
    for name in LAYOUTS:
        out = root / f"{name}_hf"
        export_checkpoint(load=root / name, out_dir=out, show_progress=False)
        exports[name] = load_file(str(out / "model.safetensors"))
    return {name: [r[name] for r in results] for name in LAYOUTS}, exports


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_iterator_matches_converter_export(worlds, layout):
    results, exports = worlds
    export = exports[layout]
    for rank in results[layout]:  # every rank (both PP stages too) holds the whole model
        assert sorted(rank["before"]) == sorted(export)  # the same tensors under the same names
        for name, tensor in export.items():
            assert torch.equal(rank["before"][name], tensor), name


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_change_detection_after_longact_step(worlds, layout):
    for rank in worlds[0][layout]:
        before, after, rows = rank["before"], rank["after"], rank["rows"]
        assert rank["first"] == list(before)  # the first refit sends everything
        assert rank["again"] == []  # nothing changed, nothing sent
        for name in before:
            differs = (before[name] != after[name]).reshape(before[name].shape[0], -1).any(1)
            assert torch.equal(rows[name], differs.nonzero().flatten()), name
            if len(rows[name]):  # the row delta turns the old tensor into the new one
                old = before[name].clone()
                apply_row_delta(old, row_delta(name, after[name], rows[name]))
                assert torch.equal(old, after[name]), name
        # LongAct freeze: exactly the selected Q/K rows moved; V, O, MLP and norms are dense.
        selection = {}
        for r in worlds[0][layout]:  # each PP stage knows its own layers
            selection.update(r["selection"])
        assert sorted(selection) == [0, 1]
        for layer, masks in selection.items():
            for proj in ("q", "k"):
                name = f"model.layers.{layer}.self_attn.{proj}_proj.weight"
                assert 0 < len(rows[name]) < before[name].shape[0]
                assert torch.equal(rows[name], masks[proj].flatten().nonzero().flatten()), name
            for dense in ("v_proj", "o_proj"):
                name = f"model.layers.{layer}.self_attn.{dense}.weight"
                assert len(rows[name]) == before[name].shape[0], name


def test_fingerprint_sees_every_single_element_change():
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        base = torch.randn(6, 40, generator=gen).to(dtype)
        reference = row_fingerprints(base)
        assert reference.shape == (6, 2) and reference.dtype == torch.int64
        for row, col in [(0, 0), (3, 17), (5, 39)]:
            changed = base.clone()
            changed[row, col] = torch.nextafter(changed[row, col].float(), torch.tensor(9.0)).to(
                dtype
            )
            if torch.equal(changed, base):  # rounding back to the same value: pick a new one
                changed[row, col] += 1
            assert changed_rows(reference, row_fingerprints(changed)).tolist() == [row]
        # two changes that cancel in the plain sum are caught by the weighted sum
        swapped = base.clone()
        swapped[2, [4, 9]] = swapped[2, [9, 4]]
        if not torch.equal(swapped, base):
            assert changed_rows(reference, row_fingerprints(swapped)).tolist() == [2]
    norm = torch.ones(8)  # 1-D: every element is a row
    bumped = norm.clone()
    bumped[5] = 2.0
    assert changed_rows(row_fingerprints(norm), row_fingerprints(bumped)).tolist() == [5]
    assert changed_rows(None, row_fingerprints(norm)).tolist() == list(range(8))


def test_stale_cpu_shared_memory_is_a_one_line_error(tmp_path):
    check_cpu_shm([0, 1], shm_dir=tmp_path)  # nothing there
    (tmp_path / "-tp:0-[0-1]-cpushm_0").write_bytes(b"")
    check_cpu_shm([2, 3], shm_dir=tmp_path)  # another TP group's
    check_cpu_shm([0], shm_dir=tmp_path)  # TP=1 uses none
    with pytest.raises(ValueError, match=r"cpushm_0 already exists .* remove it"):
        check_cpu_shm([1, 0], shm_dir=tmp_path)


def test_tp_group_must_be_consecutive():
    check_tp_group([2, 3], rank=3)
    check_tp_group([5], rank=5)
    with pytest.raises(ValueError, match="consecutive TP ranks"):
        check_tp_group([0, 2], rank=2)


def test_sampling_kwargs_give_each_rollout_its_own_seed():
    params = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=12,
                            stop_token_ids=(5, 9), seed=42)  # fmt: skip
    kwargs = [vllm_sampling_kwargs(params, index=i) for i in range(16)]
    assert len({k["seed"] for k in kwargs}) == 16  # 16 rollouts of one prompt must differ
    assert kwargs[3]["seed"] == request_seed(42, 3) != request_seed(43, 3)
    assert kwargs[0] | {"seed": 0} == dict(n=1, temperature=0.7, top_p=0.9, max_tokens=12,
                                           stop_token_ids=[5, 9], ignore_eos=True, seed=0,
                                           logprobs=0, detokenize=False)  # fmt: skip


def test_stop_strings_go_to_vllm_with_the_string_kept():
    # vLLM 0.32.0 sampling_params.py:734-737: stop strings need detokenize=True; the
    # detokenizer then cuts the text after the string (include_stop_str_in_output keeps it).
    params = SamplingParams(max_new_tokens=8, stop_token_ids=(2,), stop_strings=("</answer>",),
                            stop_sequences=((7, 8, 9),), seed=1)  # fmt: skip
    kwargs = vllm_sampling_kwargs(params, index=0)
    assert kwargs["stop"] == ["</answer>"] and kwargs["include_stop_str_in_output"] is True
    assert kwargs["detokenize"] is True and kwargs["skip_special_tokens"] is False
    assert kwargs["stop_token_ids"] == [2]
    completion = SimpleNamespace(token_ids=[7, 8, 9], finish_reason="stop", logprobs=None,
                                 text="x</answer>")  # fmt: skip
    assert to_rollout([1], completion, with_text=True).text == "x</answer>"
    assert to_rollout([1], completion).text is None


def test_refit_sends_whole_fused_modules():
    assert (
        vllm_module("model.layers.3.self_attn.k_proj.weight") == "model.layers.3.self_attn.qkv_proj"
    )
    assert (
        vllm_module("model.layers.3.self_attn.v_proj.bias") == "model.layers.3.self_attn.qkv_proj"
    )
    assert vllm_module("model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.gate_up_proj"
    assert vllm_module("model.layers.0.mlp.down_proj.weight") == "model.layers.0.mlp.down_proj"
    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
             "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight",
             "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"]  # fmt: skip
    tensors = {n: torch.ones(4, 2) for n in names}
    tracker = ChangeTracker()
    assert [n for n, _ in tracker.changed(tensors.items())] == names  # first: everything
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(4, 2)  # only k changes
    stats = RefitStats()
    sent = [n for n, _ in tracker.changed(tensors.items(), stats=stats)]
    assert sent == names[1:4]  # q, k, v: vLLM's qkv_proj is reloaded whole
    assert stats.num_changed == 1 and stats.num_sent == 3 and stats.num_tensors == 6
    tied = [n for n, _ in with_tied_head([(names[0], tensors[names[0]]), (names[1], None)])]
    assert tied == [names[0], "lm_head.weight", names[1]]


def test_rollout_seeds_never_collide():
    # the old linear formula (seed * 1_000_003 + step * 1009 + round) * 97 + rank collided at
    # 97 replicas: (step 0, round 1, rank 0) == (step 0, round 0, rank 97).
    seeds = {rollout_seed(0, step=s, round_index=r, replica=k)
             for s in range(4) for r in range(3) for k in range(256)}  # fmt: skip
    assert len(seeds) == 4 * 3 * 256 and max(seeds) < 2**63
    assert rollout_seed(0, step=0, round_index=1, replica=0) != rollout_seed(
        0, step=0, round_index=0, replica=97
    )
    assert rollout_seed(3, step=1, round_index=0, replica=5) == rollout_seed(
        3, step=1, round_index=0, replica=5
    )  # deterministic


def test_vllm_output_becomes_rollout():
    def step(token, value):  # vLLM: {token_id: Logprob}, the sampled token always present
        return {token: SimpleNamespace(logprob=value), 0: SimpleNamespace(logprob=-9.0)}

    steps = [step(7, -0.5), step(3, -1.5), step(2, -0.25)]
    completion = SimpleNamespace(token_ids=(7, 3, 2), finish_reason="stop", logprobs=steps)
    rollout = to_rollout([1, 2], completion)
    assert rollout.prompt_ids == [1, 2] and rollout.response_ids == [7, 3, 2]
    assert rollout.logprobs == [-0.5, -1.5, -0.25] and rollout.finish_reason == "stop"
    cut = to_rollout([1], SimpleNamespace(token_ids=[4], finish_reason="length", logprobs=None))
    assert cut.finish_reason == "length" and cut.logprobs == []


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed: the missing-vLLM error cannot occur")
def test_missing_vllm_names_the_field_and_the_install_command():
    from megatron_longact.config import JobConfig, load_config
    from megatron_longact.rl.rollout.vllm_engine import VLLMEngine

    job = load_config(JobConfig, None, ["rl.engine=vllm"])
    with pytest.raises(ValueError, match=r"rl\.engine.*pip install -e '\.\[vllm\]'"):
        VLLMEngine.from_train_state(job, None, None)


@pytest.mark.gpu
@pytest.mark.skipif(
    not (HAS_VLLM and torch.cuda.is_available()), reason="needs vLLM and a CUDA GPU"
)
def test_vllm_engine_sleeps_and_refits_on_gpu():
    """One GPU: sleep mode, the refit from a megatron model, per-request seeds."""
    from megatron_longact.config import JobConfig, load_config
    from megatron_longact.rl.rollout.vllm_engine import VLLMEngine
    from megatron_longact.runtime.distributed import init_distributed
    from megatron_longact.runtime.setup import setup_train_state

    overrides = ["model.preset=tiny-qwen3", "rl.engine=vllm", "rl.max_seq_length=256",
                 "rl.max_new_tokens=16"]  # fmt: skip
    job = load_config(JobConfig, None, overrides)
    state = setup_train_state(job, init_distributed(job.parallel, seed=0))
    engine = VLLMEngine.from_train_state(job, state, None)
    engine.wake()
    assert engine.last_refit.num_changed == engine.last_refit.num_tensors > 0
    params = SamplingParams(max_new_tokens=8, seed=3)
    first = engine.generate([[1, 2, 3]] * 4, params)
    assert len(first) == 4 and all(len(r.logprobs) == len(r.response_ids) for r in first)
    assert [r.response_ids for r in engine.generate([[1, 2, 3]] * 4, params)] == [
        r.response_ids for r in first
    ]
    engine.sleep()
    engine.wake()
    assert engine.last_refit.num_sent == 0  # no training in between: nothing to send


def test_auto_engine_is_native_for_moe_on_cpu():
    """rl.engine=auto never picks vLLM for an MoE model on CPU (check_moe_refit would refuse)."""
    from megatron_longact.device import on_cuda
    from megatron_longact.rl.rollout.factory import resolve_engine
    from megatron_longact.rl.rollout.vllm_engine import vllm_available

    assert resolve_engine("auto", moe=True) == (
        "vllm" if on_cuda() and vllm_available() else "native"
    )
    assert resolve_engine("auto") == ("vllm" if vllm_available() else "native")
    assert resolve_engine("vllm", moe=True) == "vllm"  # explicit: check_moe_refit's one line
