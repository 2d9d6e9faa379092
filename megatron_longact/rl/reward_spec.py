"""``rl.reward`` -> the function that scores one response: a built-in name or the user's own.

A built-in name (``REWARD_FNS``: ``format_answer``, the paper's Eq. 12, and its parts) scores
against the record's gold answer. ``package.module:function`` imports the user's function, as
verl's ``custom_reward_function.path/name`` and TRL's ``reward_funcs`` take one. Its contract:

    def my_reward(response: str, record: RLRecord) -> float | tuple[float, dict[str, float]]

``response`` is the decoded response text (with the template's think prefix, as the built-ins
see it); ``record`` the :class:`~megatron_longact.data.rl_data.RLRecord` it answers (context,
question, answer, choices, source). Return the score, or ``(score, components)``: components
``"format"`` and ``"answer"`` (> 0 counts as passed) feed ``rollout/format_rate`` and
``rollout/accuracy``; without them both read 0. A :class:`RewardResult` is accepted as is.
It runs on every rank that generates, once per response: keep it pure and cheap.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable, Mapping
from numbers import Real

from megatron_longact.data.prompts import gold_answer
from megatron_longact.data.rl_data import RLRecord
from megatron_longact.errors import UserError
from megatron_longact.rl.rewards import REWARD_FNS, RewardResult, compute_reward

ScoreFn = Callable[[str, RLRecord], RewardResult]
"""(response text, record) -> the reward of that response."""


@functools.cache
def resolve_reward(spec: str) -> ScoreFn:
    """The scoring function ``rl.reward = spec`` names (imported once per process).

    Raises:
        UserError: an unknown built-in name, a module that does not import, or a missing or
            non-callable attribute (one line naming ``rl.reward`` and the fix).
    """
    if ":" not in spec:
        if spec not in REWARD_FNS:
            raise UserError(
                f"rl.reward={spec!r} is not a reward; choose one of {sorted(REWARD_FNS)} or "
                "give your own as 'package.module:function'"
            )
        return functools.partial(_builtin, spec)
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(
            f"rl.reward={spec!r}: cannot import {module_name} ({err}); put its folder on "
            "PYTHONPATH or pip install it"
        ) from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(
            f"rl.reward={spec!r}: {module_name} has no function {attr!r}; define "
            f"{attr}(response: str, record) -> float | (float, dict) there"
        )
    return functools.partial(_user, fn, spec)


def _builtin(name: str, response: str, record: RLRecord) -> RewardResult:
    return compute_reward(name, response, gold_answer(record))


def _user(fn: Callable, spec: str, response: str, record: RLRecord) -> RewardResult:
    out = fn(response, record)
    if isinstance(out, RewardResult):
        return out
    score, components = out if isinstance(out, tuple) else (out, {})
    if not isinstance(score, Real) or isinstance(score, bool) or not math.isfinite(score):
        raise UserError(
            f"rl.reward={spec!r} returned {out!r} for record {record.id!r}; return a finite "
            "number or (number, {name: number})"
        )
    if not isinstance(components, Mapping):
        raise UserError(
            f"rl.reward={spec!r} returned components {components!r} for record {record.id!r}; "
            "give them as a dict {name: number}"
        )
    return RewardResult(
        score=float(score),
        format_ok=float(components.get("format", 0.0)) > 0,
        answer_ok=float(components.get("answer", 0.0)) > 0,
        extracted=None,
    )
