"""What every rollout engine takes and returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 4096
    stop_token_ids: tuple[int, ...] = ()
    """Generation of a sequence ends after it emits one of these (EOS, ``</answer>``...)."""
    stop_strings: tuple[str, ...] = ()
    """Generation ends once the decoded response contains one (vLLM's stop strings, with the
    string kept in the output: ``rl.rollout.stops``)."""
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    """Token sequences of the multi-token stop strings (the native engine's device check)."""
    seed: int = 0
    """Sampling seed; the same on every TP rank of a model replica."""


@dataclass(kw_only=True)
class Rollout:
    """One sampled response. Token lists are plain ints (cheap to all-gather)."""

    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float] = field(default_factory=list)
    """The engine's log-probabilities of ``response_ids`` (at the sampling temperature)."""
    finish_reason: Literal["stop", "length"] = "length"
    text: str | None = None
    """The response text the reward scores (cut after its stop string); None: decode
    ``response_ids``."""


class RolloutEngine(Protocol):
    num_generated: int
    """Responses this rank's engine has returned since it was built (TP ranks of a replica
    count the same requests; a rank's lockstep-only batches are not counted)."""

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Rollout]:
        """Samples one response per prompt. All ranks of a model replica must call it with
        the same prompts and params."""
        ...

    def sleep(self) -> None:
        """Releases generation memory before training (a no-op where nothing is held)."""
        ...

    def wake(self) -> None:
        """Re-acquires memory and picks up the trainer's current weights."""
        ...

    def close(self) -> None:
        """Releases what the engine holds beyond the run (vLLM's engine core and process
        groups) while torch.distributed is still up. All ranks, once, at the end of a run."""
        ...
