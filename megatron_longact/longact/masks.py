"""Eq. 10-11: row masks on the fused ``linear_qkv`` weight and their application to gradients.

A layer's selection ``{"q": [N, D], "k": [G, D], "v": [G, D]}`` (True = trains) becomes one
bool vector over the ``(N + 2G) * D`` rows of ``linear_qkv`` (projections not selected on
train fully), sliced to this TP rank's rows. Applying it zeroes the masked rows of
``param.main_grad`` (megatron DDP's grad buffer) of the weight and, when present, of the bias.
Nothing else in the model is touched.
"""

from __future__ import annotations

import torch

from megatron_longact.models.qkv_layout import QKVLayout


def row_mask(layout: QKVLayout, selection: dict[str, torch.Tensor]) -> torch.Tensor:
    """Global rows that train: bool [(N + 2G) * D]; projections absent from ``selection``
    (e.g. ``v`` by default) train on every row."""
    return layout.per_row({p: m.to(torch.bool).cpu() for p, m in selection.items()}, fill=True)


def local_row_mask(
    layout: QKVLayout, selection: dict[str, torch.Tensor], *, tp_rank: int
) -> torch.Tensor:
    """This TP rank's slice of :func:`row_mask`: bool [R]."""
    return row_mask(layout, selection)[layout.local_rows(tp_rank)]


def _grad_of(param: torch.nn.Parameter) -> torch.Tensor | None:
    """The gradient the optimizer will read: megatron DDP's ``main_grad``, else ``.grad``."""
    grad = getattr(param, "main_grad", None)
    return param.grad if grad is None else grad


@torch.no_grad()
def mask_gradients(qkv: torch.nn.Module, local_mask: torch.Tensor) -> None:
    """Zeroes the gradient rows of ``qkv.weight`` (and ``qkv.bias``) where ``local_mask`` is
    False. ``local_mask``: bool [R] on any device. In place on the grad buffer; no collectives.

    Call after the DP gradient reduce (megatron's ``finalize_model_grads``) and before
    ``optimizer.step()``; the mask must be identical on all DP ranks (it is: M is reduced).
    """
    keep = local_mask.to(device=qkv.weight.device, dtype=torch.bool)
    frozen = ~keep
    grad = _grad_of(qkv.weight)
    if grad is not None:
        grad.masked_fill_(frozen.unsqueeze(1), 0.0)
    bias = getattr(qkv, "bias", None)
    if isinstance(bias, torch.nn.Parameter) and bias.requires_grad:
        bias_grad = _grad_of(bias)
        if bias_grad is not None:
            bias_grad.masked_fill_(frozen, 0.0)


def jaccard(current: torch.Tensor, previous: torch.Tensor) -> float:
    """|A n B| / |A u B| of two bool masks of the same shape (1.0 when both are empty)."""
    union = int((current | previous).sum())
    if union == 0:
        return 1.0
    return int((current & previous).sum()) / union
