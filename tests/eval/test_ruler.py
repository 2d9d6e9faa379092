"""RULER generator: determinism, token budget, needle depth, task content; scoring and groups."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from megatron_longact.eval.ruler import (
    aggregate,
    generate_ruler,
    generate_ruler_task,
    make_suite,
    score_prediction,
)
from megatron_longact.eval.ruler.config import (
    NIAH_TASKS,
    RULER_TASKS,
    TABLE2_GROUPS,
    TOKENS_TO_GENERATE,
)
from megatron_longact.eval.ruler.qa import QAItem, QAPool, synthetic_qa_pool

BUDGET = 3000
QA_POOLS = {
    "qa_1": synthetic_qa_pool(seed=1, num_items=4),
    "qa_2": synthetic_qa_pool(seed=2, num_items=4),
}
# Filling stops when less than one filler unit fits; the largest unit (a QA passage) is ~60 tokens.
MIN_FILL = 0.95


@pytest.fixture(scope="module")
def ws_samples(ws_codec):
    return generate_ruler(
        max_seq_length=BUDGET, num_samples=2, tokenizer=ws_codec, qa_pools=QA_POOLS
    )


def _context(sample) -> str:
    start, end = sample.context_span
    return sample.input[start:end]


def test_every_task_fits_and_fills_the_budget(ws_samples, ws_codec):
    assert {s.task for s in ws_samples} == set(RULER_TASKS)
    for s in ws_samples:
        family = RULER_TASKS[s.task].family
        assert s.num_tokens == ws_codec.count(s.prompt) + TOKENS_TO_GENERATE[family]
        assert MIN_FILL * BUDGET <= s.num_tokens <= BUDGET, (s.task, s.num_tokens)


def test_generation_is_deterministic_by_seed(ws_samples, ws_codec):
    again = generate_ruler(
        max_seq_length=BUDGET, num_samples=2, tokenizer=ws_codec, qa_pools=QA_POOLS
    )
    assert again == ws_samples
    other = generate_ruler(
        max_seq_length=BUDGET, num_samples=2, tokenizer=ws_codec, qa_pools=QA_POOLS, seed=7
    )
    assert all(a.prompt != b.prompt for a, b in zip(other, ws_samples))
    # two samples of one task differ
    by_task = {}
    for s in ws_samples:
        by_task.setdefault(s.task, []).append(s.prompt)
    assert all(
        len(set(prompts)) == 2 for task, prompts in by_task.items() if not task.startswith("qa")
    )


def test_references_are_findable_in_the_context(ws_samples):
    for s in ws_samples:
        context = _context(s)
        for ref in s.outputs:
            assert ref in context, (s.task, ref)


@pytest.mark.parametrize("task", ["niah_single_1", "niah_single_2", "niah_multikey_2"])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.35, 0.5, 0.9])
def test_needle_sits_at_the_stated_token_depth(bpe_codec, task, depth):
    (sample,) = generate_ruler_task(
        task, num_samples=1, max_seq_length=4000, tokenizer=bpe_codec, depths=[depth]
    )
    context = _context(sample)
    (needle,) = sample.needles
    position = context.index(needle)
    measured = bpe_codec.count(context[:position]) / bpe_codec.count(context)
    assert sample.depths == (depth,)
    assert measured == pytest.approx(depth, abs=0.01)
    assert sample.num_tokens <= 4000


def test_multi_needle_depths_are_each_respected(bpe_codec):
    depths = [0.2, 0.4, 0.6, 0.8]
    (sample,) = generate_ruler_task(
        "niah_multivalue", num_samples=1, max_seq_length=4000, tokenizer=bpe_codec, depths=depths
    )
    context = _context(sample)
    total = bpe_codec.count(context)
    measured = [bpe_codec.count(context[: context.index(n)]) / total for n in sample.needles]
    assert measured == pytest.approx(depths, abs=0.01)


def test_niah_wording_and_distractors(ws_samples):
    single = next(s for s in ws_samples if s.task == "niah_single_1")
    assert single.input.startswith("A special magic number is hidden within the following text.")
    assert single.answer_prefix.endswith("mentioned in the provided text is")
    assert "The grass is green. The sky is blue." in single.input
    multi = next(s for s in ws_samples if s.task == "niah_multivalue")
    assert multi.input.startswith(
        "Some special magic numbers are hidden"
    ) and multi.answer_prefix.endswith("are")
    assert len(multi.outputs) == 4
    for task in ("niah_multikey_2", "niah_multikey_3"):
        s = next(x for x in ws_samples if x.task == task)
        query = re.search(r"special magic \w+ for (\S+) mentioned", s.answer_prefix).group(1)
        lines = _context(s).split("\n")
        assert len(lines) > 50 and all(
            line.startswith("One of the special magic") for line in lines
        )
        assert sum(query in line for line in lines) == 1  # no distractor shares the queried key


def test_variable_tracking_chain_resolves_to_the_references(ws_samples):
    s = next(x for x in ws_samples if x.task == "vt")
    value = re.search(
        r"assigned the value (\d+) in the text above", s.input.split("\n\n")[-1] + s.answer_prefix
    ).group(1)
    assignments = dict(re.findall(r"VAR (\w+) = (\w+(?: \w+)?)", _context(s)))
    resolved = set()
    for var, rhs in assignments.items():
        while rhs.startswith("VAR "):
            rhs = assignments[rhs[4:]]
        if rhs == value:
            resolved.add(var)
    assert resolved == set(s.outputs) and len(s.outputs) == 5
    assert s.input.count("Memorize and track the chain(s)") == 2  # the one-shot example first


def test_common_and_frequent_words_answers_are_the_most_frequent(ws_codec):
    (cwe,) = generate_ruler_task("cwe", num_samples=1, max_seq_length=5000, tokenizer=ws_codec)
    counts = Counter(re.findall(r"\d+\. (\w+)", _context(cwe)))
    assert all(counts[w] == 30 for w in cwe.outputs)  # freq_cw above 4k tokens
    assert max(c for w, c in counts.items() if w not in cwe.outputs) == 3
    (short_cwe,) = generate_ruler_task(
        "cwe", num_samples=1, max_seq_length=2000, tokenizer=ws_codec
    )
    assert Counter(re.findall(r"\d+\. (\w+)", _context(short_cwe)))[short_cwe.outputs[0]] == 6
    (fwe,) = generate_ruler_task("fwe", num_samples=1, max_seq_length=5000, tokenizer=ws_codec)
    ranked = [w for w, _ in Counter(_context(fwe).split()).most_common(4)]
    assert ranked[0] == "..." and ranked[1:] == list(fwe.outputs)


def test_qa_uses_the_callers_pool_and_keeps_the_gold_document(ws_codec):
    pool = QAPool(
        documents=(
            "Gold: the key is under the mat.",
            *(f"Distractor {i} talks about weather." for i in range(50)),
        ),
        items=(QAItem(question="Where is the key?", answers=("under the mat",), gold=(0,)),),
    )
    (s,) = generate_ruler_task(
        "qa_1", num_samples=1, max_seq_length=300, tokenizer=ws_codec, qa_pool=pool
    )
    assert "Document 1:\n" in s.input and "Gold: the key is under the mat." in _context(s)
    assert s.input.endswith("Question: Where is the key?") and s.answer_prefix == " Answer:"
    with pytest.raises(ValueError, match="needs a qa_pool"):
        generate_ruler_task("qa_2", num_samples=1, max_seq_length=300, tokenizer=ws_codec)


def test_caller_essay_text_is_used_as_haystack(ws_codec):
    essay = "Startups grow fast. Investors like growth. Founders work hard."
    (s,) = generate_ruler_task(
        "niah_single_2", num_samples=1, max_seq_length=600, tokenizer=ws_codec, essay_text=essay
    )
    assert _context(s).count("Investors like growth.") > 10


def test_bad_arguments_raise_clear_errors(ws_codec):
    with pytest.raises(ValueError, match="raise max_seq_length"):
        generate_ruler_task("niah_single_1", num_samples=1, max_seq_length=150, tokenizer=ws_codec)
    with pytest.raises(ValueError, match="NIAH tasks only"):
        generate_ruler_task(
            "vt", num_samples=1, max_seq_length=2000, tokenizer=ws_codec, depths=[0.5]
        )
    with pytest.raises(ValueError, match="3 entries"):
        generate_ruler_task(
            "niah_multivalue",
            num_samples=1,
            max_seq_length=2000,
            tokenizer=ws_codec,
            depths=[0.1, 0.2, 0.3],
        )
    with pytest.raises(ValueError, match="unknown RULER task"):
        generate_ruler_task("niah_single_9", num_samples=1, max_seq_length=2000, tokenizer=ws_codec)


def test_scoring_uses_match_all_for_niah_and_match_part_for_qa():
    assert (
        score_prediction("niah_multivalue", " 111, 222 and 333", ["111", "222", "333", "444"])
        == 0.75
    )
    assert score_prediction("qa_1", "<think>hmm</think> Paris, France", ["Lyon", "paris"]) == 1.0
    assert score_prediction("vt", "XYZ", ["ABCDE"]) == 0.0


def test_perfect_answers_score_100_through_the_suite(ws_samples):
    suite = make_suite(name="ruler_3k")
    records = [suite.score_sample(s, " ".join(s.outputs)) for s in ws_samples]
    scores = aggregate(records)
    assert all(scores[task] == 100.0 for task in RULER_TASKS)
    assert scores["Avg"] == 100.0
    assert suite.build_prompt(ws_samples[0]).endswith(ws_samples[0].answer_prefix)


def test_table2_groups_average_their_tasks():
    task_scores = {
        "niah_multikey_2": 0.2,
        "niah_multikey_3": 0.4,
        "niah_multivalue": 0.6,
        "vt": 1.0,
        "qa_1": 0.5,
        "qa_2": 0.0,
    }
    for task in NIAH_TASKS:
        task_scores.setdefault(task, 1.0)
    records = [{"task": t, "score": v} for t, v in task_scores.items()]
    scores = aggregate(records)
    assert TABLE2_GROUPS["NIAH-sub"] == ("niah_multikey_2", "niah_multikey_3", "niah_multivalue")
    assert scores["NIAH-sub"] == pytest.approx(40.0)
    assert scores["NIAH"] == pytest.approx(100 * (0.2 + 0.4 + 0.6 + 5 * 1.0) / 8)
    assert scores["VT"] == 100.0 and scores["QA"] == 25.0
    assert scores["Avg"] == pytest.approx((40.0 + scores["NIAH"] + 100.0 + 25.0) / 4)
