"""``longact saliency``: measure M^Q, M^K, M^V (paper Eq. 2) over a data set and save it.

Reads ``data.train_path`` (SFT conversations or RL prompts, in any container
``data.records.read_records`` reads), takes the first ``longact.profile_samples`` samples, runs them forward-only through the model from
``checkpoint.load_dir`` and writes ``longact.static_saliency_path`` (the file a
``schedule=static`` run and ``tools/plot_saliency.py`` read).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from megatron_longact.checkpoint import load_checkpoint
from megatron_longact.config.schema import JobConfig
from megatron_longact.data.chat import tokenize_conversation
from megatron_longact.data.conversations import messages_of
from megatron_longact.data.prompts import encode_prompt
from megatron_longact.data.records import read_records
from megatron_longact.data.rl_data import record_from_dict
from megatron_longact.data.tokenizer import TINY_TOKENIZER_DIR, load_tokenizer, pad_id
from megatron_longact.errors import UserError
from megatron_longact.longact.profile import profile_saliency
from megatron_longact.runtime.distributed import init_distributed
from megatron_longact.runtime.setup import setup_train_state


def _token_lists(job: JobConfig, tokenizer) -> list[list[int]]:
    path = job.data.train_path
    if path is None:
        raise UserError("longact saliency reads data.train_path; set it")
    samples = []
    for where, record in read_records(path):
        if len(samples) >= job.longact.profile_samples:
            break
        if "messages" in record or "conversations" in record:
            ids = tokenize_conversation(messages_of(record, where=where), tokenizer,
                                        max_length=job.data.seq_length).input_ids  # fmt: skip
        else:
            ids = encode_prompt(record_from_dict(record, where=where), tokenizer,
                                max_prompt_tokens=job.data.seq_length)  # fmt: skip
        samples.append(ids)
    if not samples:
        raise UserError(f"{path}: no samples to measure")
    return samples


def _batches(
    samples: list[list[int]], *, micro_batch_size: int, num_batches: int, length: int, pad: int
):
    """``num_batches`` micro-batches of exactly ``micro_batch_size`` rows of ``length`` tokens.

    Rows past the last sample are padding with an all-zero ``token_mask``: the saliency meter
    counts a sample only when it has a real token (``longact.saliency``), so every sample is
    measured while megatron's schedule sees one fixed shape on every micro-batch and rank.
    """
    assert len(samples) <= num_batches * micro_batch_size
    batches = []
    for start in range(0, num_batches * micro_batch_size, micro_batch_size):
        chunk = samples[start : start + micro_batch_size]
        tokens = torch.full((micro_batch_size, length), pad, dtype=torch.long)
        token_mask = torch.zeros(micro_batch_size, length)
        for row, ids in enumerate(chunk):
            tokens[row, : len(ids)] = torch.tensor(ids)
            token_mask[row, : len(ids)] = 1.0
        batches.append({
            "tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": token_mask,
            "token_mask": token_mask,
            "position_ids": torch.arange(length).expand(micro_batch_size, -1).contiguous(),
        })  # fmt: skip
    return batches


def run_saliency(job: JobConfig) -> Path:
    """Measures and saves M; returns the file. All ranks run it (DP ranks split the samples)."""
    out = job.longact.static_saliency_path
    if out is None:
        raise UserError("set longact.static_saliency_path: the file to write M to")
    dims = init_distributed(job.parallel, seed=job.train.seed)
    tokenizer = load_tokenizer(job.data.tokenizer_path or TINY_TOKENIZER_DIR)
    samples = _token_lists(job, tokenizer)
    mine = samples[dims.dp_rank :: dims.dp]
    state = setup_train_state(job, dims)
    if job.checkpoint.load_dir is not None:
        load_checkpoint(job.checkpoint.load_dir, model=state.model, weights_only=True)
    pad = pad_id(tokenizer)
    mbs = job.data.micro_batch_size
    # Same micro-batch count and shape on every DP rank; the ragged tail is padded, not dropped.
    num_batches = math.ceil(math.ceil(len(samples) / dims.dp) / mbs)
    # Rows in multiples of 8 tokens, and of 2 x CP: context parallel cuts them into 2 x CP chunks.
    multiple = math.lcm(8, 2 * dims.cp)
    length = -(-max(len(s) for s in samples) // multiple) * multiple
    batches = _batches(mine, micro_batch_size=mbs, num_batches=num_batches, length=length,
                       pad=pad)  # fmt: skip
    profile_saliency(state, batches, path=out, micro_batch_size=mbs, seq_length=length)
    return Path(out)
