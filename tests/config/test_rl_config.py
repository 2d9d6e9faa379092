"""RL config checks that must fire at load, not at the first score or the first update."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_longact.config import JobConfig, load_config
from megatron_longact.config.schema import RLConfig


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("rl.reward=my-rewards:score", "rl.reward='my-rewards:score' is neither a built-in"),
        ("rl.num_minibatches=0", "rl.num_minibatches must be >= 1"),
    ],
)
def test_bad_rl_fields_fail_at_load_in_one_line(override, message):
    with pytest.raises(ValueError, match=message) as err:
        load_config(JobConfig, None, [override])
    assert "\n" not in str(err.value)


def test_every_reward_name_in_the_registry_loads_and_resolves():
    from megatron_longact.rl.reward_spec import resolve_reward
    from megatron_longact.rl.rewards import REWARD_FNS

    for name in REWARD_FNS:
        assert load_config(JobConfig, None, [f"rl.reward={name}"]).rl.reward == name
        assert callable(resolve_reward(name))


def test_a_misspelt_reward_fails_at_rl_start_in_one_line():
    from megatron_longact.errors import UserError
    from megatron_longact.rl.reward_spec import resolve_reward

    job = load_config(JobConfig, None, ["rl.reward=format_anwser"])  # a name: resolved at start
    with pytest.raises(UserError, match="rl.reward='format_anwser' is not a reward; choose one of"):
        resolve_reward(job.rl.reward)


def test_every_rl_field_has_a_docstring():
    import ast
    import inspect

    source = inspect.getsource(RLConfig)
    body = ast.parse(source).body[0].body
    documented = {
        node.target.id
        for node, after in zip(body, body[1:])
        if isinstance(node, ast.AnnAssign)
        and isinstance(after, ast.Expr)
        and isinstance(after.value, ast.Constant)
    }
    missing = [f.name for f in dataclasses.fields(RLConfig) if f.name not in documented]
    assert not missing, f"RLConfig fields without a docstring: {missing}"
