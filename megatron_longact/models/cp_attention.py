"""Context-parallel core attention for megatron's local (non-TE) layer spec.

Implementation follows in the next commit; :func:`local_attention_only` is the stable switch
the rollout engine uses.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

_LOCAL_ONLY = False


@contextlib.contextmanager
def local_attention_only() -> Iterator[None]:
    """Inside it, CP attention is plain full local attention on whatever sequence it gets."""
    global _LOCAL_ONLY
    previous, _LOCAL_ONLY = _LOCAL_ONLY, True
    try:
        yield
    finally:
        _LOCAL_ONLY = previous


def is_local_only() -> bool:
    """True inside :func:`local_attention_only` (no CP collectives in attention)."""
    return _LOCAL_ONLY
