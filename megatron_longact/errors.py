"""The one error type for mistakes the user fixes from the message alone (stdlib only; every
layer may import it).

Raise :class:`UserError` for a bad config field, data line, checkpoint or path, or command-line
argument, with one line naming the file or field and the fix. ``longact`` (``cli.py``) prints it
as ``longact: error: ...`` and exits 2. Anything else (an internal invariant, a bug, a
megatron failure) keeps its traceback. It subclasses ``ValueError`` so code that already
guards a parse with ``except ValueError`` keeps working.
"""

from __future__ import annotations


class UserError(ValueError):
    """A user mistake: one line saying what is wrong, where, and how to fix it."""
