"""LongAct: saliency-guided sparse updates of the Q/K projection rows (paper section 3).

The package works with any training algorithm through one object, :class:`LongActController`
(measure in the forward, select and mask inside ``finalize_model_grads``). Modules, each one
job: ``layout`` (fused-QKV rows), ``saliency`` (Eq. 2 accumulation), ``meter`` (forward hooks),
``selection`` (Eq. 9), ``masks`` (Eq. 10-11), ``freeze`` (true freeze via optimizer hooks),
``schedule`` (when to refresh, EMA), ``controller`` (the loop's interface), ``profile``
(offline M for static masks and plots).
"""

from megatron_longact.longact.controller import LongActController
from megatron_longact.longact.profile import (
    SaliencyProfile,
    load_saliency,
    measure_saliency,
    profile_saliency,
    save_saliency,
)
from megatron_longact.longact.selection import num_selected, select_dims
from megatron_longact.models.qkv_layout import QKVLayout

__all__ = [
    "LongActController",
    "QKVLayout",
    "SaliencyProfile",
    "load_saliency",
    "measure_saliency",
    "num_selected",
    "profile_saliency",
    "save_saliency",
    "select_dims",
]
