"""``longact perturb``: clamp Q/K channels to the tensor's global mean (paper Sec. 5, Table 7,
Figure 6) and measure what breaks.

For every layer and for Q and K, the λ-fraction of each head's dims chosen by ``massive``
(top-λ of M, Eq. 9), ``min`` (bottom-λ) or ``random`` is overwritten, at the projection output
(before RoPE, where M is measured), by the global mean of that tensor: "the average of the entire
query (or key) tensor across all heads, sequence lengths, and feature dimensions" (paper Sec. 5).
With a KV cache the decode steps see one token at a time, so the mean is taken over the prompt
(prefill) and reused for the tokens generated after it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

from megatron_longact.errors import UserError
from megatron_longact.longact.profile import SaliencyProfile
from megatron_longact.longact.selection import num_selected, random_generator, select_dims
from megatron_longact.study.hf_model import projection_modules

ARMS = ("none", "massive", "min", "random")
"""``none`` is the unperturbed model; the others name :func:`select_dims` strategies."""
CLAMPED_PROJECTIONS = ("q", "k")
RANDOM_STEP = 0
"""The ``step`` fed to :func:`random_generator`: one fixed draw per seed."""

Masks = dict[int, dict[str, torch.Tensor]]
"""``{layer: {"q" | "k": bool [heads, D]}}``, True = clamped."""


def clamp_masks(profile: SaliencyProfile, *, arm: str, ratio: float, seed: int) -> Masks:
    """Which (head, dim) channels each arm clamps, from M in ``profile``.

    ``ratio=0`` (or ``arm="none"``) clamps nothing; the masks are then all False and the hooks
    are the identity, bit for bit.
    """
    if arm not in ARMS:
        raise UserError(f"perturb arm {arm!r} is not one of {ARMS}")
    masks: Masks = {}
    for layer, per in profile.saliency.items():
        masks[layer] = {}
        for projection in CLAMPED_PROJECTIONS:
            values = per[projection]
            if arm == "none" or ratio == 0:
                masks[layer][projection] = torch.zeros_like(values, dtype=torch.bool)
                continue
            num_selected(ratio, values.shape[1])  # raises a clear error for a tiny ratio
            generator = (
                random_generator(seed, step=RANDOM_STEP, layer=layer, projection=projection)
                if arm == "random"
                else None
            )
            masks[layer][projection] = select_dims(
                values, ratio=ratio, strategy=arm, generator=generator
            )
    return masks


def clamp_to_mean(output_bsr: torch.Tensor, mask_hd: torch.Tensor, mean: torch.Tensor):
    """``output`` [b, s, H * D] with the masked channels set to the scalar ``mean``."""
    return output_bsr.masked_fill(mask_hd.flatten().to(output_bsr.device), mean.item())


@contextmanager
def clamp_hooks(model, masks: Mapping[int, Mapping[str, torch.Tensor]]) -> Iterator[None]:
    """Installs the clamp on the Q/K projections of ``model`` for the ``with`` block.

    The mean is recomputed on every call with more than one token (a prompt) and kept for the
    single-token decode calls that follow it.
    """
    handles = []
    for layer, modules in projection_modules(model).items():
        for projection in CLAMPED_PROJECTIONS:
            mask_hd = masks[layer][projection]
            if not bool(mask_hd.any()):
                continue  # nothing clamped: leave the module untouched
            state: dict[str, torch.Tensor] = {}

            def hook(_module, _inputs, output_bsr, mask_hd=mask_hd, state=state):
                if output_bsr.shape[1] > 1 or "mean" not in state:
                    state["mean"] = output_bsr.detach().float().mean()
                return clamp_to_mean(output_bsr, mask_hd, state["mean"])

            handles.append(modules[projection].register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def repetition_rate(token_lists: list[list[int]], *, n: int) -> float:
    """Share of repeated n-grams: 1 - distinct / total n-grams, summed over generations.

    0 for text without a repeated n-gram; near 1 for a loop like "3333...". Generations
    shorter than ``n`` tokens contribute nothing.
    """
    total = distinct = 0
    for tokens in token_lists:
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        total += len(grams)
        distinct += len(set(grams))
    return 0.0 if total == 0 else 1.0 - distinct / total
