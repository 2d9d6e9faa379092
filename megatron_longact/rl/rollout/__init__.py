"""Rollout engines behind one interface: ``engine.generate(prompts, params) -> [Rollout]``."""

from megatron_longact.rl.rollout.types import Rollout, SamplingParams

__all__ = ["Rollout", "SamplingParams"]
