"""SFT data for the loop: tokenized chat samples packed into fixed-length bins."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from megatron_longact.config.schema import DataConfig
from megatron_longact.data.chat import TokenizedSample, load_sft_dataset
from megatron_longact.data.packing import PackedBin, collate, fill_bin, pack_samples
from megatron_longact.data.tokenizer import TINY_TOKENIZER_DIR, load_tokenizer, pad_id
from megatron_longact.errors import UserError


@dataclass(kw_only=True)
class SftData:
    tokenizer: object
    train_bins: list[PackedBin]
    val_bins: list[PackedBin]
    num_train_samples: int
    num_dropped: int


def to_bins(samples: Sequence, *, data: DataConfig, pad_token_id: int) -> list[PackedBin]:
    """Packs samples (``data.packing``) or pads each to ``seq_length`` in its own row."""
    if data.packing:
        return pack_samples(samples, seq_length=data.seq_length, pad_token_id=pad_token_id)
    return [fill_bin([s], seq_length=data.seq_length, pad_token_id=pad_token_id) for s in samples]


def pad_to_multiple(
    sample: TokenizedSample, multiple: int, *, pad_token_id: int, limit: int | None = None
):
    """``sample`` with pad tokens (no loss) appended up to a multiple of ``multiple`` tokens
    (at most ``limit`` tokens in all, the bin length).

    Context parallel cuts every packed sample into 2 x CP chunks, so THD segments must be
    multiples of 2 x CP; trailing pads are causal-invisible to the sample's real tokens.
    """
    target = -(-len(sample.input_ids) // multiple) * multiple
    if limit is not None:
        target = max(min(target, limit), len(sample.input_ids))
    extra = target - len(sample.input_ids)
    if extra == 0:
        return sample
    return TokenizedSample(input_ids=sample.input_ids + [pad_token_id] * extra,
                           loss_mask=sample.loss_mask + [0] * extra)  # fmt: skip


def load_sft_data(data: DataConfig, *, pad_multiple: int = 1) -> SftData:
    """Tokenizes ``data.train_path`` (and ``val_path``) and bins them.

    Every sample is padded to a multiple of ``data.sequence_multiple`` (capped at
    ``data.seq_length``) before packing, whatever the layout: the bins, their order and so the
    losses are the same at every TP/CP/PP/DP layout. ``pad_multiple`` is what the layout needs
    (2 x CP under context parallel); it must divide ``data.sequence_multiple`` and
    ``data.seq_length``.

    Raises FileNotFoundError / DataFormatError naming the file (and line) on bad input.
    """
    if data.seq_length % pad_multiple:
        raise UserError(
            f"data.seq_length={data.seq_length} must be divisible by 2 x context_parallel_size "
            f"({pad_multiple})"
        )
    if data.sequence_multiple % pad_multiple:
        raise UserError(
            f"data.sequence_multiple={data.sequence_multiple} must be divisible by 2 x "
            f"context_parallel_size ({pad_multiple}); set it to a multiple of {pad_multiple}"
        )
    if data.train_path is None:
        raise UserError(
            "data.train_path is not set; point it at SFT conversations (JSONL, parquet or an HF folder)"
        )
    tokenizer = load_tokenizer(data.tokenizer_path or TINY_TOKENIZER_DIR)
    pad = pad_id(tokenizer)
    train = load_sft_dataset(data.train_path, tokenizer, max_length=data.seq_length)
    if len(train) == 0 and train.num_dropped == 0:
        raise UserError(
            f"data.train_path={data.train_path} holds no samples (an empty file or folder); "
            "point it at a chat data file with at least one record"
        )
    if len(train) == 0:
        raise UserError(
            f"{data.train_path}: no sample fits data.seq_length={data.seq_length}; raise it"
        )
    val = (
        load_sft_dataset(data.val_path, tokenizer, max_length=data.seq_length)
        if data.val_path
        else []
    )
    pad_kwargs = dict(pad_token_id=pad, limit=data.seq_length)
    train_samples = [pad_to_multiple(x, data.sequence_multiple, **pad_kwargs) for x in train]
    val_samples = [pad_to_multiple(x, data.sequence_multiple, **pad_kwargs) for x in val]
    return SftData(
        tokenizer=tokenizer,
        train_bins=to_bins(train_samples, data=data, pad_token_id=pad),
        val_bins=to_bins(val_samples, data=data, pad_token_id=pad),
        num_train_samples=len(train),
        num_dropped=train.num_dropped,
    )


def bin_collate(*, use_thd: bool) -> Callable[[Sequence[PackedBin]], dict[str, torch.Tensor]]:
    """Collate for the attention backend: THD ``cu_seqlens`` (TE) or block-causal masks.

    With masks the batch keeps ``cu_seqlens`` as metadata (LongAct's per-sample saliency
    reads it; the forward step uses the mask). ``token_mask`` [B, S] marks real tokens.
    """

    def batch_of(bins: Sequence[PackedBin]) -> dict[str, torch.Tensor]:
        batch = collate(bins, with_attention_mask=not use_thd)
        token_mask = torch.zeros_like(batch["loss_mask"])
        for row, packed in enumerate(bins):
            token_mask[row, : int(packed.cu_seqlens[packed.num_samples])] = 1.0
        batch["token_mask"] = token_mask
        return batch

    return batch_of
