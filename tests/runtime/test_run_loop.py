"""The loop skeleton both ``run_sft`` and ``run_rl`` use (``runtime.loop.run_loop``), driven by a
plain step function in one process: logging interval, per-interval callbacks, resume from
``progress.step``, the writer closed when a step raises; and the typed progress that
checkpoints carry as a dict. The real steps run through it in tests/reference (bit for bit)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from megatron_longact.config import JobConfig, load_config
from megatron_longact.runtime.loop import Every, run_loop
from megatron_longact.runtime.setup import TrainProgress


def _job(tmp_path, *overrides: str) -> JobConfig:
    return load_config(JobConfig, None, ["train.train_steps=6", "optim.warmup_steps=0",
                                         "logging.progress=false",
                                         f"logging.tensorboard_dir={tmp_path / 'tb'}",
                                         *overrides])  # fmt: skip


def _state(step: int = 0) -> SimpleNamespace:
    # What run_loop reads of a TrainState: the model list (preflight sizes a checkpoint only
    # when checkpoint.save_dir is set) and the progress counters.
    return SimpleNamespace(model=[], progress=TrainProgress(step=step))


def _logged(tmp_path) -> list[dict]:
    lines = (tmp_path / "tb" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_rows_are_written_every_log_interval_and_with_each_callback(tmp_path):
    calls = []

    def step_fn(step: int):
        calls.append(step)
        return None if step == 4 else {"train/loss": float(step)}  # step 4: no update

    last = run_loop(_job(tmp_path, "train.log_interval=2"), _state(), step_fn, name="t",
                    describe=lambda m: "", every=[Every(3, lambda s: {"val/x": 10.0 * s})])  # fmt: skip
    assert calls == [1, 2, 3, 4, 5, 6]
    # Step 3's callback row is written off the log interval: an evaluation is never dropped.
    assert _logged(tmp_path) == [{"step": 2, "train/loss": 2.0},
                                 {"step": 3, "train/loss": 3.0, "val/x": 30.0},
                                 {"step": 6, "train/loss": 6.0, "val/x": 60.0}]  # fmt: skip
    assert last == {"train/loss": 6.0, "val/x": 60.0}


def test_callbacks_at_start_and_after_the_last_step(tmp_path):
    every = Every(4, lambda s: {"heldout/acc": float(s)}, at_start=True, at_last=True)
    run_loop(_job(tmp_path, "train.log_interval=100"), _state(), lambda s: {"m": 1.0}, name="t",
             describe=lambda m: "", every=[every])  # fmt: skip
    assert [(row["step"], row["heldout/acc"]) for row in _logged(tmp_path)] == [
        (0, 0.0), (4, 4.0), (6, 6.0)]  # fmt: skip


def test_a_resumed_state_runs_only_the_remaining_steps(tmp_path):
    calls = []
    state = _state(step=4)
    run_loop(_job(tmp_path), state, lambda s: calls.append(s) or {"m": 1.0}, name="t",
             describe=lambda m: "")  # fmt: skip
    assert calls == [5, 6] and state.progress.step == 6
    assert [row["step"] for row in _logged(tmp_path)] == [5, 6]


def test_the_writer_is_closed_when_a_step_raises(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def step_fn(step: int):
        if step == 3:
            raise RuntimeError("boom")
        return {"train/loss": float(step)}

    with pytest.raises(RuntimeError, match="boom"):
        run_loop(_job(tmp_path), _state(), step_fn, name="t", describe=lambda m: "")
    # TensorBoard buffers events until close (flush_secs=120): they are on disk only if the
    # skeleton closed the writer on the way out.
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]


def test_progress_round_trips_and_reads_checkpoints_saved_as_plain_dicts():
    progress = TrainProgress(step=7, consumed_samples=56, prompts_consumed=28)
    assert TrainProgress.from_state_dict(progress.state_dict()) == progress
    # An SFT checkpoint written before the dataclass: {"step", "consumed_samples"} only.
    old = TrainProgress.from_state_dict({"step": 3, "consumed_samples": 24})
    assert old == TrainProgress(step=3, consumed_samples=24, prompts_consumed=0)


def test_warmup_is_computed_in_one_place():
    job = load_config(JobConfig, None, ["train.train_steps=100", "optim.warmup_ratio=0.03"])
    assert job.lr_warmup_steps == 3  # ceil(0.03 x 100)
    job = load_config(JobConfig, None, ["train.train_steps=100", "optim.warmup_steps=7"])
    assert job.lr_warmup_steps == 7
