"""Packing on the real GPTModel: packed and unpacked losses are equal, and packed samples never
see each other (changing sample A's tokens leaves sample B's logits unchanged)."""

from __future__ import annotations

import torch

from megatron_longact.data.chat import TokenizedSample
from megatron_longact.data.packing import pack_samples, unpacked_batch
from megatron_longact.runtime.launch import run_local

SEQ = 48


def _samples(seed: int) -> list[TokenizedSample]:
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for length in (13, 20, 9):
        ids = torch.randint(3, 1000, (length,), generator=gen).tolist()
        mask = [0] * (length // 2) + [1] * (length - length // 2)  # loss on the second half
        samples.append(TokenizedSample(input_ids=ids, loss_mask=mask))
    return samples


def _check():
    from megatron_longact.config import JobConfig, load_config
    from megatron_longact.runtime.distributed import init_distributed
    from megatron_longact.runtime.forward import lm_forward_step
    from megatron_longact.runtime.setup import setup_train_state, unwrap_gpt
    from megatron_longact.runtime.train_step import eval_step
    from megatron_longact.sft.data import bin_collate

    job = load_config(JobConfig, None, ["model.preset=micro-qwen3"])
    state = setup_train_state(job, init_distributed(job.parallel, seed=11))
    collate = bin_collate(use_thd=False)
    samples = _samples(0)
    bins = pack_samples(samples, seq_length=SEQ)
    assert len(bins) == 1 and bins[0].num_samples == 3  # all three share one row
    packed = collate(bins)
    unpacked = unpacked_batch(samples, SEQ)
    unpacked.pop("cu_seqlens"), unpacked.pop("max_seqlen")

    def loss(batch):
        return eval_step(state, forward_step_func=lm_forward_step, data_iterator=iter([batch]),
                         num_microbatches=1, seq_length=SEQ,
                         micro_batch_size=batch["tokens"].shape[0])  # fmt: skip

    gpt = unwrap_gpt(state.model[0]).eval()

    @torch.no_grad()
    def logits(batch):
        return gpt(input_ids=batch["tokens"], position_ids=batch["position_ids"],
                   attention_mask=batch["attention_mask"])  # fmt: skip

    # Change sample A (the first segment of the packed row) and nothing else.
    changed = [TokenizedSample(input_ids=[(t + 7) % 1000 + 3 for t in samples[0].input_ids],
                               loss_mask=samples[0].loss_mask), *samples[1:]]  # fmt: skip
    changed_bin = pack_samples(changed, seq_length=SEQ)
    assert changed_bin[0].sample_indices == bins[0].sample_indices
    return {
        "packed": loss(packed),
        "unpacked": loss(unpacked),
        "cu_seqlens": bins[0].cu_seqlens,
        "order": bins[0].sample_indices,
        "logits": logits(packed)[0],
        "logits_changed": logits(collate(changed_bin))[0],
    }


def test_packed_equals_unpacked_and_samples_are_isolated():
    (res,) = run_local(_check, 1)
    (packed_loss, packed_count), (unpacked_loss, unpacked_count) = res["packed"], res["unpacked"]
    assert packed_count == unpacked_count > 0
    torch.testing.assert_close(torch.tensor(packed_loss), torch.tensor(unpacked_loss),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    cu = res["cu_seqlens"].tolist()
    a = res["order"].index(0)  # the segment holding sample A
    a_start, a_end = cu[a], cu[a + 1]
    inside_a = torch.zeros(SEQ, dtype=torch.bool)
    inside_a[a_start:a_end] = True
    real = torch.zeros(SEQ, dtype=torch.bool)
    real[: cu[3]] = True
    others = real & ~inside_a
    # Sample A's own logits changed; every other sample's logits are bitwise unchanged.
    assert not torch.equal(res["logits"][inside_a], res["logits_changed"][inside_a])
    assert torch.equal(res["logits"][others], res["logits_changed"][others])
