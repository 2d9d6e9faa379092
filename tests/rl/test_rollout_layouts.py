"""Rollouts under the training layouts (issue: native engine under TP + SP and CP).

The same HF weights (a random micro Qwen3 saved as a real HF folder) are loaded into megatron at
TP=1 (DP=2), TP=2 with sequence parallel, and CP=2 (megatron's CP groups, the local CP
attention), two gloo processes each. ``generate_groups`` then runs greedy rollouts of the same
prompts, with the default stop strings. Checked:

* the rollouts are identical token for token in all three layouts;
* every (prompt, rollout) pair is generated exactly once: the engines of all replicas (DP x CP;
  a TP group counts once) together decode prompts x rollouts sequences.

Sequence parallel: the local layer spec's torch norm refuses to be built with SP
(``transformer/torch_norm.py`` ~32), so the TP=2 model is built without it and then switched to
SP with megatron's ``set_model_to_sequence_parallel``; its forward is then megatron's SP forward
(reduce-scattered embeddings, all-gathered linear inputs), which is what trips the one-token
decode step.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_longact.runtime.launch import run_local

NUM_PROMPTS, ROLLOUTS, NEW_TOKENS = 3, 2, 10
LAYOUTS = {
    "tp1_dp2": [],
    "tp2_sp": ["parallel.tensor_model_parallel_size=2"],
    "cp2": ["parallel.context_parallel_size=2"],
}


def _hf_folder(out: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_longact.models.hf_config import ASSETS_DIR

    config = AutoConfig.from_pretrained(ASSETS_DIR / "micro-qwen3")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger weights than HF's init, so greedy paths vary per prompt
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.2)
    model.save_pretrained(out)
    return out


class _Counting:
    """The engine, counting the sequences this rank asks it for."""

    def __init__(self, engine):
        self.engine, self.sequences = engine, 0

    def generate(self, prompts, params):
        self.sequences += len(prompts)
        return self.engine.generate(prompts, params)


def _layout_rollouts(overrides: list[str], hf_dir: str, rl_path: str, sequence_parallel: bool):
    from megatron.core.transformer.utils import set_model_to_sequence_parallel

    from megatron_longact.config import JobConfig, load_config
    from megatron_longact.data.tokenizer import TINY_TOKENIZER_DIR, load_tokenizer
    from megatron_longact.models.gpt import (
        build_gpt_model,
        load_architecture,
        make_transformer_config,
    )
    from megatron_longact.models.hf_weights.hf_files import HFWeights
    from megatron_longact.models.hf_weights.hf_to_mcore import load_hf_into_chunk
    from megatron_longact.rl.data import load_rl_records
    from megatron_longact.rl.experience import generate_groups
    from megatron_longact.rl.rollout.native import NativeEngine
    from megatron_longact.rl.rollout.stops import resolve_stop_conditions
    from megatron_longact.rl.rollout.types import SamplingParams
    from megatron_longact.runtime.distributed import init_distributed

    job = load_config(JobConfig, None, [
        "model.preset=micro-qwen3", f"model.hf_path={hf_dir}", "model.attention_backend=local",
        "train.precision=fp32", f"data.train_path={rl_path}", f"rl.rollouts_per_prompt={ROLLOUTS}",
        f"rl.max_new_tokens={NEW_TOKENS}", "rl.max_seq_length=256", *overrides,
    ])  # fmt: skip
    dims = init_distributed(job.parallel, seed=0)
    arch = load_architecture(job.model)
    config = make_transformer_config(arch, model=job.model, parallel=job.parallel, train=job.train)
    gpt = build_gpt_model(arch, config, model=job.model)
    load_hf_into_chunk(gpt, HFWeights(hf_dir), arch=arch, tp_rank=dims.tp_rank, tp=dims.tp)
    if sequence_parallel:
        set_model_to_sequence_parallel(gpt, True)
    tok = load_tokenizer(TINY_TOKENIZER_DIR)
    records = load_rl_records(job.rl, job.data)[:NUM_PROMPTS]
    engine = _Counting(NativeEngine(gpt, pad_token_id=0, batch_size=2, tokenizer=tok))
    stops = resolve_stop_conditions(tok, job.rl.stop_strings)
    params = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS, seed=1,
                            stop_token_ids=stops.token_ids, stop_strings=stops.strings,
                            stop_sequences=stops.sequences)  # fmt: skip
    groups = generate_groups(engine, records, tokenizer=tok, rl=job.rl, params=params)
    return {
        "rollouts": [[s.response_ids for s in g] for g in groups],
        "sequences": engine.sequences,
        "tp_rank": dims.tp_rank,
        "sp_restored": gpt.config.sequence_parallel == sequence_parallel,
    }


@pytest.mark.slow  # three 2-process worlds: ~60 s idle, ~3 min on a loaded 2-core machine
def test_greedy_rollouts_identical_at_tp1_tp2_sp_and_cp2(synthetic_data_dir, tmp_path):
    hf_dir = str(_hf_folder(tmp_path / "hf"))
    rl_path = str(synthetic_data_dir / "rl_train.jsonl")
    results = {
        name: run_local(_layout_rollouts, 2, overrides, hf_dir, rl_path, name == "tp2_sp")
        for name, overrides in LAYOUTS.items()
    }
    reference = results["tp1_dp2"][0]["rollouts"]
    assert len(reference) == NUM_PROMPTS and all(len(g) == ROLLOUTS for g in reference)
    assert all(len(r) > 1 for g in reference for r in g), reference
    assert len({tuple(g[0]) for g in reference}) > 1, "greedy paths should differ per prompt"
    for name, ranks in results.items():
        for rank in ranks:
            assert rank["rollouts"] == reference, name
            assert rank["sp_restored"], name
        # A TP group decodes together: count each replica once.
        generated = sum(r["sequences"] for r in ranks if r["tp_rank"] == 0)
        assert generated == NUM_PROMPTS * ROLLOUTS, (name, [r["sequences"] for r in ranks])
