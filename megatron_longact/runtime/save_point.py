"""The end of every training step, for both loops: agree on a stop, save when due, say so."""

from __future__ import annotations

import logging

from megatron_longact.checkpoint import save_if_due
from megatron_longact.config.schema import CheckpointConfig
from megatron_longact.runtime.signals import StopRequest

logger = logging.getLogger(__name__)


def save_point(
    state,
    ckpt: CheckpointConfig,
    stop: StopRequest,
    *,
    step: int,
    last_step: int,
    config_yaml: str = "",
    extra: dict | None = None,
) -> bool:
    """Ends step ``step`` of a :class:`runtime.setup.TrainState`: the ranks agree whether a
    stop was requested, the state is saved when due (``checkpoint.save_interval``, the last
    step, or the stop), and the return value says whether the loop must stop now.

    All ranks must call it (the agreement and the save are collective).
    """
    stopping = stop.agreed(step=step)
    save_if_due(state, ckpt, step=step, last_step=last_step, stopping=stopping,
                config_yaml=config_yaml, extra=extra)  # fmt: skip
    if stopping:
        logger.warning("stopped after step %d on request; resume by re-running", step)
    return stopping
