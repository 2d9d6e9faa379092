"""Training rows from scored samples: right-padded [b, L] tensors per micro-batch.

Row layout for prompt p (length P) and response r (length R), L >= P + R::

    tokens         p0 .. p{P-1} r0 .. r{R-1} pad ..
    labels         tokens shifted left by one (pad at the end)
    response_mask  1 where the *label* is a response token: positions P-1 .. P+R-2
    token_mask     1 on the P + R real tokens (saliency excludes padding)

Right padding needs no attention mask: under the causal mask real tokens never see pads.
"""

from __future__ import annotations

import math

import torch

from megatron_longact.rl.experience import Sample

SEQ_MULTIPLE = 8  # pad lengths to a multiple of this (tensor-core friendly, CP-splittable)


def padded_length(samples: list[Sample], *, multiple: int = SEQ_MULTIPLE) -> int:
    """The common row length L for a global batch."""
    longest = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    return int(math.ceil(longest / multiple) * multiple)


def make_rows(
    samples: list[Sample], *, length: int, pad_token_id: int, overlong_filter: bool = False
) -> dict[str, torch.Tensor]:
    """Stacks samples into ``tokens, labels, position_ids`` [b, L] int64 and ``response_mask,
    token_mask, advantages`` [b, L] float32. ``overlong_filter`` zeroes truncated responses."""
    batch = len(samples)
    tokens = torch.full((batch, length), pad_token_id, dtype=torch.long)
    response_mask = torch.zeros(batch, length)
    token_mask = torch.zeros(batch, length)
    advantages = torch.zeros(batch, length)
    engine_logp = torch.zeros(batch, length)
    for row, s in enumerate(samples):
        prompt, response = len(s.prompt_ids), len(s.response_ids)
        tokens[row, : prompt + response] = torch.tensor(s.prompt_ids + s.response_ids)
        token_mask[row, : prompt + response] = 1.0
        if response and not (overlong_filter and s.truncated):
            response_mask[row, prompt - 1 : prompt + response - 1] = 1.0
        advantages[row] = s.advantage
        engine_logp[row, prompt - 1 : prompt - 1 + len(s.engine_logprobs)] = torch.tensor(
            s.engine_logprobs
        )
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, -1] = pad_token_id
    return {
        "tokens": tokens,
        "labels": labels,
        "position_ids": torch.arange(length).expand(batch, -1).contiguous(),
        "response_mask": response_mask,
        "token_mask": token_mask,
        "advantages": advantages * response_mask,
        "engine_logp": engine_logp,
        # [b]: whole-sequence response tokens (context parallel slices only [b, L] fields).
        "seq_tokens": response_mask.sum(dim=1),
    }


def split_rows(rows: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive chunks of ``size`` rows (micro-batches)."""
    total = rows["tokens"].shape[0]
    return [{k: v[i : i + size] for k, v in rows.items()} for i in range(0, total, size)]
