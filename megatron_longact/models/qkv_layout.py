"""Where each (head, dim) of Q, K and V lives in megatron's fused ``linear_qkv`` (pure torch).

The one place this layout is written down: LongAct's row masks and saliency (``longact/``) and
the HF <-> megatron converter (``convert``) both use :class:`QKVLayout`.

The paper indexes a separate ``W_Q`` with ``j(h, d) = h * D + d`` (Eq. 8). megatron fuses Q, K
and V into one ``ColumnParallelLinear`` whose ``(N + 2G) * D`` output rows go group by group:
for query group ``g`` the rows of its ``n = N / G`` query heads, then ``k_g``, then ``v_g``,
``D`` rows each (megatron/core/transformer/attention.py, ``SelfAttention.
get_query_key_value_tensors``, 0.16.1 ~1371-1491). With ``B = (n + 2) * D`` rows per group::

    q(h, d) -> (h // n) * B + (h % n) * D + d
    k(g, d) -> g * B + n * D + d
    v(g, d) -> g * B + (n + 1) * D + d

Tensor parallelism shards the rows into ``T`` contiguous blocks of ``R = (N + 2G) * D / T``;
rank ``t`` holds global rows ``[t * R, (t + 1) * R)`` of the weight, of its bias and of the
layer's output channels. (When ``G < T`` the ranks then all-gather the output inside attention,
so the heads a rank computes are not the rows it holds; masks follow the weight rows.)

Two pairs of operations, on two kinds of data:

* per-row values (a saliency vector, a mask) <-> per-head tables: :meth:`QKVLayout.per_head`
  ``[(N + 2G) * D, ...] -> {"q": [N, D, ...], "k": [G, D, ...], "v": [G, D, ...]}`` and its
  inverse :meth:`QKVLayout.per_row`;
* HF's separate projection weights <-> the fused weight: :meth:`QKVLayout.fuse`
  ``q [N*D, ...], k [G*D, ...], v [G*D, ...] -> [(N + 2G) * D, ...]`` and :meth:`QKVLayout.unfuse`.

Notation used across ``longact/``: ``N`` query heads, ``G`` query groups (KV heads), ``D`` head
dim, ``T`` tensor-parallel size, "rows" = output rows of ``linear_qkv``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from megatron_longact.errors import UserError

if TYPE_CHECKING:
    from megatron_longact.models.hf_config import HFArchitecture

PROJECTIONS = ("q", "k", "v")


@dataclass(frozen=True, kw_only=True)
class QKVLayout:
    """Row layout of one attention layer's fused QKV projection."""

    num_heads: int
    """N: query heads (all TP ranks together)."""
    num_groups: int
    """G: query groups = KV heads (``num_query_groups``; equals N for MHA)."""
    head_dim: int
    """D: ``kv_channels``."""
    tp_size: int = 1
    """T: tensor-parallel size."""

    def __post_init__(self) -> None:
        if self.num_heads % self.num_groups:
            raise UserError(
                f"num_heads={self.num_heads} is not a multiple of num_groups={self.num_groups}"
            )
        if self.num_rows % self.tp_size:
            raise UserError(
                f"{self.num_rows} fused QKV rows do not split over tensor parallel size "
                f"{self.tp_size}"
            )

    @classmethod
    def from_transformer_config(cls, config) -> QKVLayout:
        """The layout of a megatron ``TransformerConfig`` (no gated attention)."""
        if getattr(config, "attention_output_gate", False):
            raise UserError(
                "gated attention (attention_output_gate) adds gate rows to linear_qkv; LongAct's "
                "row layout does not cover it"
            )
        return cls(
            num_heads=config.num_attention_heads,
            num_groups=config.num_query_groups or config.num_attention_heads,
            head_dim=config.kv_channels,
            tp_size=config.tensor_model_parallel_size,
        )

    @classmethod
    def from_hf(cls, arch: HFArchitecture, *, tp_size: int = 1) -> QKVLayout:
        """The layout of a Hugging Face architecture (``models.hf_config.HFArchitecture``)."""
        return cls(
            num_heads=arch.num_attention_heads,
            num_groups=arch.num_query_groups,
            head_dim=arch.head_dim,
            tp_size=tp_size,
        )

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_groups

    @property
    def rows_per_group(self) -> int:
        return (self.heads_per_group + 2) * self.head_dim

    @property
    def num_rows(self) -> int:
        """Global output rows of ``linear_qkv``: ``(N + 2G) * D``."""
        return (self.num_heads + 2 * self.num_groups) * self.head_dim

    @property
    def rows_per_rank(self) -> int:
        """R: rows of ``linear_qkv.weight`` on one TP rank."""
        return self.num_rows // self.tp_size

    def num_projection_heads(self, projection: str) -> int:
        """N for ``q``, G for ``k`` and ``v``."""
        return self.num_heads if projection == "q" else self.num_groups

    def q_row(self, head: int, dim: int) -> int:
        """Global row of query head ``head``, dim ``dim``."""
        n, D = self.heads_per_group, self.head_dim
        return (head // n) * self.rows_per_group + (head % n) * D + dim

    def k_row(self, group: int, dim: int) -> int:
        return group * self.rows_per_group + self.heads_per_group * self.head_dim + dim

    def v_row(self, group: int, dim: int) -> int:
        return group * self.rows_per_group + (self.heads_per_group + 1) * self.head_dim + dim

    def rows(self, projection: str) -> torch.Tensor:
        """Global row index of every (head, dim) of ``projection``: int64 ``[heads, D]``."""
        n, D, B = self.heads_per_group, self.head_dim, self.rows_per_group
        dims = torch.arange(D)
        if projection == "q":
            heads = torch.arange(self.num_heads)
            start = (heads // n) * B + (heads % n) * D
        elif projection in ("k", "v"):
            offset = n * D if projection == "k" else (n + 1) * D
            start = torch.arange(self.num_groups) * B + offset
        else:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
        return start[:, None] + dims[None, :]

    def local_rows(self, tp_rank: int) -> slice:
        """The global rows held by TP rank ``tp_rank``."""
        return slice(tp_rank * self.rows_per_rank, (tp_rank + 1) * self.rows_per_rank)

    def per_head(self, per_row: torch.Tensor) -> dict[str, torch.Tensor]:
        """Global per-row values ``[(N + 2G) * D, ...]`` -> ``{"q": [N, D, ...], "k", "v"}``."""
        if per_row.shape[0] != self.num_rows:
            raise ValueError(f"expected {self.num_rows} rows, got shape {tuple(per_row.shape)}")
        return {p: per_row[self.rows(p)] for p in PROJECTIONS}

    def per_row(self, per_head: dict[str, torch.Tensor], *, fill) -> torch.Tensor:
        """Inverse of :meth:`per_head`: ``{"q": [N, D], ...}`` -> ``[(N + 2G) * D]``.

        Projections missing from ``per_head`` take ``fill`` (a scalar of the result's dtype).
        """
        first = next(iter(per_head.values()))
        out = torch.full((self.num_rows,), fill, dtype=first.dtype, device=first.device)
        for projection, values in per_head.items():
            out[self.rows(projection).to(out.device)] = values
        return out

    def fuse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """HF ``q [N*D, ...]``, ``k [G*D, ...]``, ``v [G*D, ...]`` (weights ``[., H]`` or biases)
        -> the fused ``[(N + 2G) * D, ...]`` in megatron's row order (all TP ranks together)."""
        rest = q.shape[1:]
        g, d, n = self.num_groups, self.head_dim, self.heads_per_group
        grouped = torch.cat(
            [q.reshape(g, n * d, *rest), k.reshape(g, d, *rest), v.reshape(g, d, *rest)], dim=1
        )
        return grouped.reshape(self.num_rows, *rest)

    def unfuse(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inverse of :meth:`fuse`: ``[(N + 2G) * D, ...]`` -> ``(q [N*D, ...], k [G*D, ...],
        v [G*D, ...])``, contiguous."""
        if qkv.shape[0] != self.num_rows:
            raise ValueError(
                f"fused QKV has {qkv.shape[0]} rows; {self.num_heads} heads, "
                f"{self.num_groups} groups of head_dim {self.head_dim} need {self.num_rows}"
            )
        rest = qkv.shape[1:]
        g, d, n = self.num_groups, self.head_dim, self.heads_per_group
        q, k, v = qkv.reshape(g, (n + 2) * d, *rest).split([n * d, d, d], dim=1)
        return (
            q.reshape(g * n * d, *rest).contiguous(),
            k.reshape(g * d, *rest).contiguous(),
            v.reshape(g * d, *rest).contiguous(),
        )
