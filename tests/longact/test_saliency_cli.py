"""``longact saliency`` measures every sample: the ragged tail is padded, never dropped."""

from __future__ import annotations

import math

import pytest

from megatron_longact.longact.cli import _batches


def _count_real_rows(batches) -> int:
    return sum(int((b["token_mask"].sum(dim=1) > 0).sum()) for b in batches)


@pytest.mark.parametrize("num_samples", [1, 7, 8])
@pytest.mark.parametrize("dp", [1, 2])
def test_every_sample_is_in_a_batch_at_every_micro_batch_size(num_samples, dp):
    samples = [[5] * (3 + i) for i in range(num_samples)]  # the last one is the longest
    length = (max(map(len, samples)) + 7) // 8 * 8
    for mbs in range(1, 10):
        num_batches = math.ceil(math.ceil(num_samples / dp) / mbs)
        shards = [samples[rank::dp] for rank in range(dp)]
        per_rank = [_batches(s, micro_batch_size=mbs, num_batches=num_batches, length=length,
                             pad=0) for s in shards]  # fmt: skip
        assert sum(_count_real_rows(b) for b in per_rank) == num_samples, mbs
        for batches in per_rank:  # one fixed shape on every micro-batch of every rank
            assert len(batches) == num_batches
            assert {tuple(b["tokens"].shape) for b in batches} == {(mbs, length)}
        # Each sample keeps its tokens, in order.
        rows = [
            b["tokens"][r, : int(b["token_mask"][r].sum())].tolist()
            for b in per_rank[0]
            for r in range(mbs)
            if b["token_mask"][r].sum() > 0
        ]
        assert rows == shards[0]


def _saliency_case(folder: str, *, micro_batch_size: int) -> int:
    from megatron_longact.config import JobConfig, load_config
    from megatron_longact.longact.cli import run_saliency
    from megatron_longact.longact.profile import load_saliency

    out = f"{folder}/m.safetensors"
    job = load_config(JobConfig, None, [
        "model.preset=micro-qwen3", f"data.train_path={folder}/rl.jsonl", "data.seq_length=256",
        f"data.micro_batch_size={micro_batch_size}", "longact.profile_samples=7",
        f"longact.static_saliency_path={out}",
    ])  # fmt: skip
    run_saliency(job)
    return load_saliency(out).num_samples


@pytest.mark.slow  # two spawned gloo ranks building the micro model: ~60 s on 2 shared cores
def test_saliency_cli_counts_all_samples_with_a_ragged_tail(tmp_path):
    from megatron_longact.data.jsonl import write_jsonl
    from megatron_longact.data.synthetic import make_rl_records
    from megatron_longact.data.tokenizer import TINY_TOKENIZER_DIR, load_tokenizer
    from megatron_longact.runtime.launch import run_local

    tiny_tokenizer = load_tokenizer(TINY_TOKENIZER_DIR)
    records = make_rl_records(num_samples=9, context_tokens=60, tokenizer=tiny_tokenizer, seed=3)
    write_jsonl(tmp_path / "rl.jsonl", records)
    # 7 of 9 samples on 2 DP ranks (4 + 3) at micro-batch 3: the old code measured 3 + 3 = 6.
    counts = run_local(_saliency_case, 2, str(tmp_path), micro_batch_size=3)
    assert counts == [7, 7]
