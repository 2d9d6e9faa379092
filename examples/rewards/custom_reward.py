"""A user reward for ``rl.reward: "custom_reward:concise_answer"`` (a plug-in example).

Put this folder on the path and name the function, as verl's ``custom_reward_function`` does:

    PYTHONPATH=examples/rewards longact rl --config examples/quickstart_rl_cpu.yaml \\
        rl.reward=custom_reward:concise_answer

The contract (``megatron_longact.rl.reward_spec``): ``fn(response, record)`` gets the decoded
response text and the :class:`~megatron_longact.data.rl_data.RLRecord` it answers, and returns
a score, or ``(score, components)``. The components ``"format"`` and ``"answer"`` (> 0: passed)
feed ``rollout/format_rate`` and ``rollout/accuracy``. It runs once per response on every rank
that generates: keep it pure and cheap.
"""

from __future__ import annotations

from megatron_longact.rl.rewards import format_answer_reward

LENGTH_PENALTY_PER_CHAR = 1e-3
"""Score lost per character of the answer block beyond ``FREE_CHARS``."""
FREE_CHARS = 32


def concise_answer(response: str, record) -> tuple[float, dict[str, float]]:
    """The paper's format + answer reward (0..2), minus a small penalty for a long answer."""
    base = format_answer_reward(response, record.answer)
    answer = response.rsplit("<answer>", 1)[-1].split("</answer>", 1)[0]
    penalty = LENGTH_PENALTY_PER_CHAR * max(len(answer) - FREE_CHARS, 0)
    return base.score - penalty, {
        "format": float(base.format_ok),
        "answer": float(base.answer_ok),
        "length_penalty": penalty,
    }
