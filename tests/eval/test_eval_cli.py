"""``longact eval`` end to end with a recording backend: the exact model inputs it sends.

The backend is the only stand-in (it records the model inputs and answers with a fixed text);
configs, loaders, suites, prompt budgets, chat templates, the runner and the tables are the
real ones. The official LongBench v2 prompt is rebuilt here with pred.py's own steps from the
verbatim prompt files (fixtures/longbench_v2_prompts, THUDM/LongBench at 2e00731).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_longact.config import JobConfig, load_config
from megatron_longact.data.tokenizer import TINY_TOKENIZER_DIR, load_tokenizer
from megatron_longact.eval import infinitebench
from megatron_longact.eval.cli import run_eval

PROMPTS = Path(__file__).parent / "fixtures" / "longbench_v2_prompts"
WINDOW = 1024  # max_position_embeddings of the micro-qwen3 preset
MAX_NEW = 32


class Recorder:
    """A backend: ``(job, tokenizer) -> complete``; keeps every model input it is sent."""

    def __init__(self, answer: str) -> None:
        self.answer = answer
        self.inputs: list[str] = []
        self.budgets: list[int] = []  # max_new_tokens of each model input

    def __call__(self, job, tokenizer):
        def complete(model_inputs: list[str], *, max_new_tokens: int) -> list[str]:
            self.inputs += model_inputs
            self.budgets += [max_new_tokens] * len(model_inputs)
            return [self.answer] * len(model_inputs)

        return complete


def _job(tmp_path, overrides: list[str]) -> JobConfig:
    return load_config(JobConfig, None, [
        "model.preset=micro-qwen3", f"eval.out_dir={tmp_path / 'out'}",
        f"eval.max_new_tokens={MAX_NEW}", "logging.progress=false", *overrides,
    ])  # fmt: skip


def _longbench_items() -> list[dict]:
    base = {"domain": "Single-Document QA", "sub_domain": "Financial", "difficulty": "easy",
            "length": "short", "choice_B": " two ", "choice_C": "three", "choice_D": "four"}  # fmt: skip
    return [
        # A short one (no truncation), with padding the official .strip() removes.
        {
            **base,
            "_id": "lb-0",
            "question": "  How many? \n",
            "choice_A": "one",
            "answer": "A",
            "context": "\n  The report lists one item.  \n",
        },  # fmt: skip
        # A long one: the official middle truncation cuts it to the budget.
        {
            **base,
            "_id": "lb-1",
            "question": "Which year?",
            "choice_A": "1990",
            "answer": "B",
            "difficulty": "hard",
            "length": "long",
            "context": " ".join(f"In year {1000 + i} the river rose." for i in range(400)),
        },  # fmt: skip
    ]


def _official_longbench_prompt(item: dict, tokenizer, max_len: int) -> str:
    """THUDM/LongBench pred.py:93 (fill) and :27-30 (truncate), step by step."""
    template = (PROMPTS / "0shot.txt").read_text(encoding="utf-8")
    prompt = (
        template.replace("$DOC$", item["context"].strip())
        .replace("$Q$", item["question"].strip())
        .replace("$C_A$", item["choice_A"].strip())
        .replace("$C_B$", item["choice_B"].strip())
        .replace("$C_C$", item["choice_C"].strip())
        .replace("$C_D$", item["choice_D"].strip())
    )
    input_ids = tokenizer.encode(prompt)  # pred.py: default special tokens (none for ChatML)
    if len(input_ids) > max_len:
        input_ids = input_ids[: max_len // 2] + input_ids[-max_len // 2 :]
        prompt = tokenizer.decode(input_ids, skip_special_tokens=True)
    return prompt


def _chat(tokenizer, messages: list[dict]) -> str:
    """What an OpenAI-style chat server (vLLM) feeds the model for ``messages``."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_official_longbench_v2_prompt_byte_for_byte(tmp_path):
    tokenizer = load_tokenizer(TINY_TOKENIZER_DIR)
    data = tmp_path / "data.json"
    data.write_text(json.dumps(_longbench_items()), encoding="utf-8")
    recorder = Recorder("The correct answer is (B)")
    job = _job(tmp_path, ["eval.suites=[longbench_v2]", f"eval.longbench_v2_path={data}",
                          "eval.prompt_style=official"])  # fmt: skip
    tables = run_eval(job, backend=recorder)

    # The default budget: the model's window minus the new tokens and the chat scaffold.
    scaffold = len(tokenizer.encode(_chat(tokenizer, [{"role": "user", "content": ""}])))
    max_len = WINDOW - MAX_NEW - scaffold
    expected = [
        _chat(tokenizer, [{"role": "user", "content": _official_longbench_prompt(it, tokenizer,
                                                                                  max_len)}])
        for it in _longbench_items()
    ]  # fmt: skip
    assert recorder.inputs == expected
    assert "In year 1200 " not in expected[1] and "In year 1000 " in expected[1]  # truncated
    assert len(tokenizer.encode(recorder.inputs[1])) <= WINDOW - MAX_NEW
    # Scored with the official extractor: lb-1 (answer B) right, lb-0 (answer A) wrong.
    scores = json.loads((tmp_path / "out" / "longbench_v2_0shot.scores.json").read_text())
    assert (scores["Overall"], scores["Hard"], scores["Easy"]) == (50.0, 100.0, 0.0)
    assert [t.name for t in tables] == ["table_longbench_v2.md"]


def test_answer_tag_style_and_explicit_budget(tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(_longbench_items()[:1]), encoding="utf-8")
    recorder = Recorder("<think>x</think><answer>A</answer>")
    job = _job(tmp_path, ["eval.suites=[longbench_v2]", f"eval.longbench_v2_path={data}",
                          "eval.prompt_style=answer_tag", "eval.max_prompt_tokens=4000"])  # fmt: skip
    run_eval(job, backend=recorder)
    assert "inside <answer></answer>" in recorder.inputs[0]
    scores = json.loads((tmp_path / "out" / "longbench_v2_answer_tag.scores.json").read_text())
    assert scores["Overall"] == 100.0


def test_infinitebench_chat_models_get_the_official_system_turn(tmp_path):
    tokenizer = load_tokenizer(TINY_TOKENIZER_DIR)
    folder = tmp_path / "ib"
    folder.mkdir()
    rows = {task: {"id": 0, "context": "Fay met Hal. The pass key is 123.", "input": "Who?",
                   "answer": ["Fay"], "options": []} for task in infinitebench.TASKS}  # fmt: skip
    rows["longbook_choice_eng"].update(options=["Eve", "Fay", "Gus", "Hal"])
    for task, row in rows.items():
        (folder / f"{task}.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")
    recorder = Recorder("Fay")
    run_eval(_job(tmp_path, ["eval.suites=[infinitebench]", f"eval.infinitebench_dir={folder}"]),
             backend=recorder)  # fmt: skip
    row = rows["longbook_qa_eng"]
    user = infinitebench.CHAT_TEMPLATES["longbook_qa_eng"].format(
        context=row["context"], question=row["input"]
    )
    system = {"role": "system", "content": "You are a helpful assistant"}  # eval_utils.py:272
    assert _chat(tokenizer, [system, {"role": "user", "content": user}]) in recorder.inputs
    assert len(recorder.inputs) == 6
    assert all(x.startswith(_chat(tokenizer, [system])[:40]) for x in recorder.inputs)
    scores = json.loads((tmp_path / "out" / "infinitebench_chat.scores.json").read_text())
    assert scores["En.MC"] == 100.0  # "Fay" is the option text: official `pred in label`
    assert recorder.budgets == [MAX_NEW] * 6  # eval.max_new_tokens set: it rules every task


def test_infinitebench_uses_the_official_budget_of_each_task_by_default(tmp_path):
    folder = tmp_path / "ib"
    folder.mkdir()
    for task in infinitebench.TASKS:
        row = {"id": 0, "context": "The pass key is 123.", "input": "?", "answer": ["123"],
               "options": ["123", "4", "5", "6"] if task == "longbook_choice_eng" else []}  # fmt: skip
        (folder / f"{task}.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")
    recorder = Recorder("123")
    job = load_config(JobConfig, None, [
        "model.preset=micro-qwen3", f"eval.out_dir={tmp_path / 'out'}", "logging.progress=false",
        "eval.suites=[infinitebench]", f"eval.infinitebench_dir={folder}",
        "eval.max_prompt_tokens=200",  # the micro model's window cannot hold En.Sum's 1200
    ])  # fmt: skip
    run_eval(job, backend=recorder)
    # eval_utils.DATA_NAME_TO_MAX_NEW_TOKENS: passkey 6, number_string 12, En.Sum 1200, the
    # QA and choice tasks 40.
    assert sorted(recorder.budgets) == [6, 12, 40, 40, 40, 1200]
    assert infinitebench.MAX_NEW_TOKENS["longbook_sum_eng"] == 1200


# ------------------------------------------------------------------------------------ RULER


def _ruler_rows(task: str) -> list[dict]:
    """Rows as NVIDIA/RULER's niah.py:283-290 / qa.py:213-220 write them (at c3f5e3b)."""
    if task.startswith("niah"):
        return [{"index": 812, "input": "Some text. One of the special magic numbers for "
                 "calm-river is: 4419. More text.\nWhat is the special magic number for "
                 "calm-river mentioned in the provided text?", "outputs": ["4419"],
                 "length": 180, "length_w_model_temp": 180,
                 "answer_prefix": " The special magic number for calm-river mentioned in the "
                 "provided text is", "token_position_answer": 3}]  # fmt: skip
    return [{"index": 0, "input": "Answer the question based on the given documents.\n\n"
             "Document 1:\nOslo is in Norway.\n\nQuestion: Where is Oslo?", "outputs":
             ["Norway"], "length": 120, "length_w_model_temp": 120,
             "answer_prefix": " Answer:"}]  # fmt: skip


def test_ruler_own_files_are_sent_as_is(tmp_path):
    data = tmp_path / "qwen3" / "synthetic" / "4096" / "data"
    for task in ("niah_single_1", "qa_1"):
        (data / task).mkdir(parents=True)
        lines = "".join(json.dumps(r) + "\n" for r in _ruler_rows(task))
        (data / task / "validation.jsonl").write_text(lines, encoding="utf-8")
    recorder = Recorder(" 4419 and Norway")
    job = _job(tmp_path, ["eval.suites=[ruler]", f"eval.ruler_data_dirs=[{data}]"])
    run_eval(job, backend=recorder)
    rows = _ruler_rows("niah_single_1") + _ruler_rows("qa_1")
    assert sorted(recorder.inputs) == sorted(r["input"] + r["answer_prefix"] for r in rows)
    scores = json.loads((tmp_path / "out" / "ruler-4k.scores.json").read_text())
    assert scores["niah_single_1"] == 100.0 and scores["qa_1"] == 100.0


def test_ruler_qa_pools_and_essay_haystack_from_the_config(tmp_path):
    squad = {"data": [{"title": "t", "paragraphs": [
        {"context": "The Loire flows through Tours.", "qas": [
            {"question": "Which river flows through Tours?", "answers": [{"text": "Loire"}],
             "is_impossible": False}]},
        {"context": "Lyon lies on the Rhone.", "qas": []}]}]}  # fmt: skip
    hotpot = [{"question": "Who built the tower?", "answer": "Gustave",
               "context": [["Tower", ["The tower was built by Gustave."]],
                           ["Bridge", ["The bridge is old."]]]}]  # fmt: skip
    (tmp_path / "squad.json").write_text(json.dumps(squad))
    (tmp_path / "hotpot.json").write_text(json.dumps(hotpot))
    essays = tmp_path / "essays"
    essays.mkdir()
    (essays / "b.txt").write_text("Startups grow by making things people want. ")
    (essays / "a.txt").write_text("Founders should talk to users early. ")
    recorder = Recorder("Loire Gustave")
    base = ["eval.suites=[ruler]", "eval.ruler_lengths=[512]", "eval.ruler_num_samples=1"]
    with pytest.raises(ValueError, match="eval.ruler_squad_path"):
        run_eval(_job(tmp_path, [*base, "eval.ruler_tasks=[qa_1]"]), backend=recorder)
    job = _job(tmp_path, [*base, "eval.ruler_tasks=[qa_1,qa_2,niah_single_2]",
                          f"eval.ruler_squad_path={tmp_path / 'squad.json'}",
                          f"eval.ruler_hotpotqa_path={tmp_path / 'hotpot.json'}",
                          f"eval.ruler_haystack_path={essays}"])  # fmt: skip
    run_eval(job, backend=recorder)
    qa_1, qa_2, niah = recorder.inputs
    assert "Which river flows through Tours?" in qa_1 and "Who built the tower?" in qa_2
    assert "Founders should talk to users early." in niah and "Startups grow" in niah
    scores = json.loads((tmp_path / "out" / "ruler-512.scores.json").read_text())
    assert scores["qa_1"] == 100.0 and scores["qa_2"] == 100.0
