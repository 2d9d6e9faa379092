"""The native engine on a real megatron GPTModel (micro-qwen3, one gloo process, fp32 unless said):

* the rotated-key cache gives bit-identical tokens and log-probs to megatron's stock static
  path (which re-rotates the whole cache every step), greedy and sampled;
* the lean decode-step layer forward is bit-identical to megatron's ``TransformerLayer.forward``;
* the grouped-query attention and the TP=1 linears give the same tokens as megatron's own
  modules, and log-probs within 1e-5 (the matmuls change shape, not the math);
* multi-token stop strings end a response at the exact token vLLM would stop at, both when the
  string's own token sequence appears and when it only appears in the decoded text; other rows
  of the batch are untouched, and the text the reward sees ends with the stop string;
* the decode steps run under inference mode, and a training step right after works;
* in bf16 inside Float16Module and DDP (the cluster's layout, fp32 masters in the distributed
  optimizer) the same holds, and an optimizer step follows generation.
"""

from __future__ import annotations

import contextlib

from megatron_longact.runtime.launch import run_local

PROMPTS = ["The answer is <answer>", "Read the document and", "key value pairs: k1 = 4,"]
NEW_TOKENS = 14


def _expected_stop(tok, response: list[int], stop: str) -> int | None:
    """Brute force over whole-prefix decodes: the first length whose text has ``stop`` ending
    in that token's new characters."""
    for end in range(1, len(response) + 1):
        text = tok.decode(response[:end], skip_special_tokens=False)
        before = tok.decode(response[: end - 1], skip_special_tokens=False)
        start = max(0, len(before) - len(stop) + 1)
        if text.find(stop, start) != -1:
            return end
    return None


FAST_PIECES = ("rotated_key_cache", "grouped_query_attention", "_tp1_linears", "lean_decode_layers")
"""The engine's context managers that replace megatron's own path (``native._generation_layout``)."""


@contextlib.contextmanager
def _stock(native, *names: str):
    """Inside it, the engine runs megatron's own path instead of its pieces ``names``."""
    saved = {name: getattr(native, name) for name in names}
    for name in names:
        setattr(native, name, lambda gpt: contextlib.nullcontext())
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(native, name, value)


def _engine_for(model):
    """``(engine, tokenizer, prompt ids)``: the engine under test on ``model`` (any wrapper)."""
    from megatron_longact.data.tokenizer import TINY_TOKENIZER_DIR, load_tokenizer
    from megatron_longact.rl.rollout.native import NativeEngine

    tok = load_tokenizer(TINY_TOKENIZER_DIR)
    prompts = [tok.encode(p, add_special_tokens=False) for p in PROMPTS]
    return NativeEngine(model, pad_token_id=0, batch_size=2, tokenizer=tok), tok, prompts


def _train_backward(model, *, batch: int, length: int) -> None:
    """A training forward and backward of ``model`` on random tokens [batch, length]."""
    import torch

    model.train()
    ids = torch.randint(3, 100, (batch, length))
    positions = torch.arange(length)[None].expand(batch, -1)
    logits = model(input_ids=ids, position_ids=positions, attention_mask=None)
    logits.float().square().mean().backward()


def _engine_case() -> dict:
    from megatron_longact.config import JobConfig, load_config
    from megatron_longact.models.gpt import (
        build_gpt_model,
        load_architecture,
        make_transformer_config,
    )
    from megatron_longact.rl.rollout import native
    from megatron_longact.rl.rollout.stops import resolve_stop_conditions
    from megatron_longact.rl.rollout.types import SamplingParams
    from megatron_longact.runtime.distributed import init_distributed

    job = load_config(JobConfig, None, ["model.preset=micro-qwen3", "train.precision=fp32"])
    init_distributed(job.parallel, seed=3)
    arch = load_architecture(job.model)
    config = make_transformer_config(arch, model=job.model, parallel=job.parallel, train=job.train)
    gpt = build_gpt_model(arch, config, model=job.model)
    engine, tok, prompts = _engine_for(gpt)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS, seed=5)
    sampled = SamplingParams(temperature=1.0, max_new_tokens=NEW_TOKENS, seed=5)

    def run(params):
        out = engine.generate(prompts, params)
        return [(r.response_ids, r.logprobs, r.finish_reason) for r in out]

    fast = {"greedy": run(greedy), "sampled": run(sampled)}
    # megatron's stock static path: the engine without our rotated-key cache.
    with _stock(native, "rotated_key_cache"):
        stock = {"greedy": run(greedy), "sampled": run(sampled)}
    # megatron's TransformerLayer.forward at every step, the rest as in the engine.
    with _stock(native, "lean_decode_layers"):
        stock_layers = {"greedy": run(greedy), "sampled": run(sampled)}
    # megatron's own layers, attention and linears (and its static path) throughout.
    with _stock(native, *FAST_PIECES):
        megatron = {"greedy": run(greedy), "sampled": run(sampled)}

    # Stop strings cut from row 0's greedy response: its own tokens, and the same text minus
    # its first character (tokenized differently alone, so only the decoded tail shows it).
    response0 = fast["greedy"][0][0]
    whole = tok.decode(response0[3:6], skip_special_tokens=False)
    cases = {}
    for name, stop in (("tokens", whole), ("in_context", whole[1:])):
        stops = resolve_stop_conditions(tok, [stop])
        params = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS, seed=5,
                                stop_token_ids=(), stop_strings=stops.strings,
                                stop_sequences=stops.sequences)  # fmt: skip
        out = engine.generate(prompts, params)
        cases[name] = {
            "stop": stop,
            "encoded": tok.encode(stop, add_special_tokens=False),
            "rows": [(r.response_ids, r.finish_reason, r.text) for r in out],
            "expected": [_expected_stop(tok, full, stop) for full, _, _ in fast["greedy"]],
        }
    # Training right after generation, at the last batch's cache length (so RoPE's lru-cached
    # table is the one generation used): nothing the inference-mode decode steps made may reach
    # autograd ("Inference tensors cannot be saved for backward" otherwise).

    length = len(prompts[-1]) + NEW_TOKENS
    # The table training will get: GPTModel's own call (gpt_model.py ~364-369), an lru_cache hit.
    table = gpt.rotary_pos_emb(length, packed_seq=False, cp_group=None)
    _train_backward(gpt, batch=1, length=length)
    trained = all(p.grad is None or bool(p.grad.isfinite().all()) for p in gpt.parameters())
    return {
        "inference_mode_decode": engine.inference_mode_decode,
        "rope_table_is_inference": table.is_inference(),
        "trained_after": trained and gpt.decoder.layers[0].mlp.linear_fc1.weight.grad is not None,
        "fast": fast,
        "stock": stock,
        "stock_layers": stock_layers,
        "megatron": megatron,
        "cases": cases,
        "greedy": fast["greedy"],
    }


def test_native_engine_rotated_cache_and_stop_strings():
    (result,) = run_local(_engine_case, 1)
    assert result["inference_mode_decode"] and result["trained_after"]
    assert not result["rope_table_is_inference"]
    # Bit for bit: tokens, and log-probs compared as floats with ==.
    assert result["fast"] == result["stock"]
    assert result["fast"] == result["stock_layers"]
    for mode, rows in result["megatron"].items():
        for (ids, logprobs, reason), (want_ids, want_lp, want_reason) in zip(
            rows, result["fast"][mode]
        ):
            assert (ids, reason) == (want_ids, want_reason), mode
            assert max(abs(a - b) for a, b in zip(logprobs, want_lp)) < 1e-5, mode
    greedy = result["greedy"]
    assert all(len(ids) == NEW_TOKENS for ids, _, _ in greedy)
    assert len({tuple(ids) for ids, _, _ in greedy}) == len(PROMPTS)
    for name, case in result["cases"].items():
        assert case["expected"][0] is not None and case["expected"][0] <= 6, case
        for row, ((ids, reason, text), want, (full, _, _)) in enumerate(
            zip(case["rows"], case["expected"], greedy)
        ):
            if want is None:
                assert (ids, reason) == (full, "length"), (name, row)
            else:
                assert ids == full[:want] and reason == "stop", (name, row, ids, full, want)
                assert text.endswith(case["stop"]), (name, row, text)
    # The in-context string's own tokens are not what row 0 generated: only the decoded-tail
    # check can have stopped it.
    in_context = result["cases"]["in_context"]
    want, encoded = in_context["expected"][0], in_context["encoded"]
    assert greedy[0][0][want - len(encoded) : want] != encoded, in_context


def _bf16_case() -> dict:
    """The cluster's layout on CPU: bf16 params in Float16Module under DDP, fp32 masters in the
    distributed optimizer; generate, then a training step through the same objects."""

    from megatron_longact.config import JobConfig, load_config
    from megatron_longact.rl.rollout import native
    from megatron_longact.rl.rollout.types import SamplingParams
    from megatron_longact.runtime.distributed import init_distributed
    from megatron_longact.runtime.setup import setup_train_state

    job = load_config(JobConfig, None, ["model.preset=micro-qwen3", "train.precision=bf16"])
    state = setup_train_state(job, init_distributed(job.parallel, seed=3))
    engine, _, prompts = _engine_for(state.model[0])
    greedy = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS, seed=5)

    def run():
        return [(r.response_ids, r.logprobs) for r in engine.generate(prompts, greedy)]

    fast = run()
    with _stock(native, "lean_decode_layers"):
        stock_layers = run()
    with _stock(native, *FAST_PIECES):
        megatron = run()
    ddp = state.model[0]
    _train_backward(ddp, batch=2, length=20)
    stepped, grad_norm, _ = state.optimizer.step()
    return {
        "dtype": str(next(engine.model.parameters()).dtype),
        "inference_mode_decode": engine.inference_mode_decode,
        "fast": fast,
        "stock_layers": stock_layers,
        "megatron": megatron,
        "stepped": stepped and grad_norm is not None and grad_norm > 0,
    }


def test_native_engine_bf16_float16_module_then_training_step():
    (result,) = run_local(_bf16_case, 1)
    assert result["dtype"] == "torch.bfloat16" and result["inference_mode_decode"]
    assert result["fast"] == result["stock_layers"]  # the lean layer forward, bit for bit
    for (ids, logprobs), (want_ids, want_lp) in zip(result["fast"], result["megatron"]):
        assert ids == want_ids
        assert max(abs(a - b) for a, b in zip(logprobs, want_lp)) < 1e-2  # bf16 (0.0 measured)
    assert result["stepped"]  # nothing from the inference-mode decode steps reached autograd
