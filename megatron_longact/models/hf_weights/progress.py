"""A rich progress bar that costs nothing when disabled (non-zero ranks, tests)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def progress_bar(description: str, *, total: int, enabled: bool) -> Iterator[Callable[[], None]]:
    """Yields ``advance()``, which moves the bar one step (a no-op when not ``enabled``)."""
    if not enabled:
        yield lambda: None
        return
    from rich.progress import Progress

    with Progress() as progress:
        task = progress.add_task(description, total=total)
        yield lambda: progress.advance(task)
