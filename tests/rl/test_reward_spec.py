"""``rl.reward``: a built-in name or ``package.module:function`` (the user's reward), resolved at
RL start; the plug-in's score and components reach the sample the RL step trains on."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_longact.config import JobConfig, load_config
from megatron_longact.data.rl_data import RLRecord
from megatron_longact.errors import UserError
from megatron_longact.rl.experience import _score
from megatron_longact.rl.reward_spec import resolve_reward
from megatron_longact.rl.rewards import compute_reward
from megatron_longact.rl.rollout.types import Rollout

EXAMPLE_DIR = Path(__file__).resolve().parents[2] / "examples" / "rewards"
RECORD = RLRecord(id="r0", context="The key is 42.", question="Key?", answer="42", choices=None,
                  source="test")  # fmt: skip
RIGHT = "<think>it says 42</think><answer>42</answer>"


@pytest.fixture
def example_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE_DIR))


def test_a_builtin_name_scores_as_compute_reward():
    for response in (RIGHT, "<answer>41</answer>", "42"):
        assert resolve_reward("format_answer")(response, RECORD) == compute_reward(
            "format_answer", response, "42"
        )


def test_the_example_plugin_loads_and_scores(example_on_path):
    job = load_config(JobConfig, None, ["rl.reward=custom_reward:concise_answer"])
    score = resolve_reward(job.rl.reward)
    right = score(RIGHT, RECORD)
    assert (right.score, right.format_ok, right.answer_ok) == (2.0, True, True)
    rambling = score("<think>x</think><answer>42" + " and so on" * 10 + "</answer>", RECORD)
    assert rambling.answer_ok and 0 < 2.0 - rambling.score < 0.1  # the length penalty


def test_the_plugin_score_is_what_the_rl_step_trains_on(example_on_path):
    from megatron_longact.data.tokenizer import TINY_TOKENIZER_DIR, load_tokenizer

    rl = load_config(JobConfig, None, ["rl.reward=custom_reward:concise_answer",
                                       "rl.overlong_buffer=0"]).rl  # fmt: skip
    rollout = Rollout(prompt_ids=[1, 2], response_ids=[3, 4], finish_reason="stop", text=RIGHT)
    sample = _score(rollout, RECORD, tokenizer=load_tokenizer(TINY_TOKENIZER_DIR), rl=rl)
    assert (sample.reward, sample.format_ok, sample.answer_ok) == (2.0, True, True)


def _plain(response, record):
    return 0.5


def _bad(response, record):
    return "high"


def test_a_plain_number_counts_as_neither_format_nor_answer():
    result = resolve_reward(f"{__name__}:_plain")(RIGHT, RECORD)
    assert (result.score, result.format_ok, result.answer_ok) == (0.5, False, False)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("format_anwser", r"rl.reward='format_anwser' is not a reward; choose one of"),
        ("no_such_pkg.rewards:score", r"cannot import no_such_pkg.rewards .*PYTHONPATH"),
        (f"{__name__}:missing", r"has no function 'missing'"),
    ],
)
def test_a_bad_spec_is_a_one_line_user_error(spec, message):
    with pytest.raises(UserError, match=message) as err:
        resolve_reward(spec)
    assert "\n" not in str(err.value)


def test_a_bad_return_value_names_the_record():
    with pytest.raises(UserError, match=r"returned 'high' for record 'r0'"):
        resolve_reward(f"{__name__}:_bad")(RIGHT, RECORD)
