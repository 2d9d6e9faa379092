"""Rule-based rewards: the format rule, answer extraction and matching, the registry."""

import pytest

from megatron_longact.rl.rewards import (
    REWARD_FNS,
    RewardResult,
    check_format,
    compute_reward,
    extract_choice_letter,
    extract_free_answer,
    gold_choice_letter,
    infer_answer_type,
    normalize_squad,
    number_match,
    parse_number,
    qa_match,
)

GOOD = "<think>\nThe text says Paris.\n</think>\n<answer>Paris</answer>"


# ------------------------------------------------------------------------------------- format


@pytest.mark.parametrize(
    "response",
    [
        GOOD,
        GOOD + "<|im_end|>",
        GOOD + "\n<|im_end|>\n<|endoftext|>",
        "  \n" + GOOD + "  \n",
        "<think>a</think>Summary first.<answer>b</answer>",  # text between blocks is allowed
    ],
)
def test_format_accepts(response):
    assert check_format(response)
    assert compute_reward("format", response, None).score == 1.0


@pytest.mark.parametrize(
    "response",
    [
        "<think></think><answer>Paris</answer>",  # empty think
        "<think>reason</think><answer>   </answer>",  # blank answer
        "<think>a</think><think>b</think><answer>c</answer>",  # repeated tag
        "<think>a</think><answer>b</answer><answer>c</answer>",  # repeated answer
        "<answer>b</answer><think>a</think>",  # wrong order
        "<think>a<answer>b</think></answer>",  # interleaved
        "<think>a</think>no answer block",  # missing answer
        "Paris",  # nothing
        "preamble <think>a</think><answer>b</answer>",  # text before <think>
        "<think>a</think><answer>b</answer> trailing words",  # text after </answer>
        "<think>a</think><answer>b</answer><|im_end|> more",  # text after the EOS
    ],
)
def test_format_rejects(response):
    assert not check_format(response)
    assert compute_reward("format", response, None).score == 0.0


def test_format_response_prefix_counts_the_prompt_opened_think():
    response = "reasoning here\n</think>\n<answer>B</answer>"
    assert not check_format(response)
    assert check_format(response, response_prefix="<think>\n")


# --------------------------------------------------------------------------- multiple choice


@pytest.mark.parametrize(
    ("response", "letter"),
    [
        ("<think>x</think><answer>C</answer>", "C"),
        ("<think>x</think><answer>(C)</answer>", "C"),
        ("<think>x</think><answer>C. The third option</answer>", "C"),
        ("<think>x</think><answer>**The correct answer is (B).**</answer>", "B"),
        # LongBench v2 official regexes after the last </think>, '*' removed (paper Fig. 6).
        ("<think>D maybe</think>\n\n**The correct answer is (D).**", "D"),
        ("<think>x</think> The correct answer is A", "A"),
        ("The correct answer is (B)", "B"),  # no think block: the whole response
        # The think block's guess does not count, only the text after </think>.
        ("<think>The correct answer is (A)</think> The correct answer is (C)", "C"),
        ("<think>x</think><answer>a</answer>", None),  # lower case is not an option
        ("<think>x</think><answer>E</answer>", None),  # outside A-D
        ("<think>x</think><answer>I think so</answer>", None),
        ("<think>x</think> I pick C", None),  # no official phrase, no tags
    ],
)
def test_extract_choice_letter(response, letter):
    assert extract_choice_letter(response) == letter


def test_gold_choice_letter_forms_and_error():
    assert gold_choice_letter("C") == "C"
    assert gold_choice_letter("(C)") == "C"
    assert gold_choice_letter("The correct answer is (A)") == "A"
    with pytest.raises(ValueError, match="answer_qa"):
        gold_choice_letter("Paris")


def test_answer_mc_reward():
    right = compute_reward("answer_mc", "<think>x</think><answer>(B)</answer>", "B")
    assert right == RewardResult(score=1.0, format_ok=False, answer_ok=True, extracted="B")
    wrong = compute_reward("answer_mc", "<think>x</think><answer>A</answer>", "B")
    assert (wrong.score, wrong.answer_ok, wrong.extracted) == (0.0, False, "A")


# ------------------------------------------------------------------------------------ free QA


def test_normalize_squad():
    assert normalize_squad("  The  Eiffel-Tower, in PARIS! ") == "eiffeltower in paris"
    assert normalize_squad("An apple a day") == "apple day"
    assert normalize_squad("the") == ""


@pytest.mark.parametrize(
    ("prediction", "gold", "mode", "ok"),
    [
        ("The Paris.", "paris", "exact", True),
        ("It is Paris, France", "Paris", "exact", False),
        ("It is Paris, France", "Paris", "substring", True),
        ("It is Paris, France", ["Lyon", "paris france"], "substring", True),  # aliases
        ("1990", "1", "substring", False),  # substring respects word boundaries
        ("the", "the", "exact", False),  # empty after normalization never matches
        ("Paris", "Paris, France", "substring", False),  # gold must be inside the prediction
    ],
)
def test_qa_match(prediction, gold, mode, ok):
    assert qa_match(prediction, gold, mode=mode) is ok


def test_extract_free_answer_tags_then_the_answer_is():
    assert extract_free_answer("<answer> a </answer> <answer>Rome</answer>") == "Rome"
    assert extract_free_answer("<think>hm</think>Therefore, the answer is Rome.") == "Rome"
    assert extract_free_answer("<think>the answer is Oslo</think> not sure") is None
    assert extract_free_answer("no answer here") is None


def test_answer_qa_reward():
    r = compute_reward("answer_qa", "<think>x</think><answer>the city of Paris</answer>", ["Paris"])
    assert (r.score, r.answer_ok, r.extracted) == (1.0, True, "the city of Paris")
    r = compute_reward("answer_qa", "<think>x</think><answer>Paris</answer>", "Lyon")
    assert r.score == 0.0
    r = compute_reward("answer_qa", "<think>Paris</think>", "Paris")  # nothing extracted
    assert (r.score, r.extracted) == (0.0, None)


# ------------------------------------------------------------------------------------ numbers


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1,234.50", 1234.5),
        ("about -3 apples", -3.0),
        ("$40", 40.0),
        ("15%", 15.0),
        ("2.5e3", 2500.0),
        (".5", 0.5),
        ("none", None),
    ],
)
def test_parse_number(text, value):
    assert parse_number(text) == value


def test_number_match():
    assert number_match("1,000.00", "1000")
    assert number_match("3.50", "3.5")
    assert number_match("42 units", ["41", "42"])
    assert not number_match("42.1", "42")
    assert not number_match("forty-two", "42")


def test_answer_number_reward():
    r = compute_reward("answer_number", "<think>x</think><answer>12,000</answer>", "12000.0")
    assert (r.score, r.extracted) == (1.0, "12,000")


# ------------------------------------------------------------------------------ paper reward


def test_infer_answer_type():
    assert infer_answer_type("C") == "mc"
    assert infer_answer_type("The correct answer is (B)") == "mc"
    assert infer_answer_type("1,250.5") == "number"
    assert infer_answer_type(["12", "12.0"]) == "number"
    assert infer_answer_type("Paris") == "qa"
    assert infer_answer_type(["A Tale of Two Cities"]) == "qa"


def test_format_answer_is_the_sum_of_both_parts():
    both = compute_reward("format_answer", "<think>x</think><answer>B</answer>", "B")
    assert (both.score, both.format_ok, both.answer_ok) == (2.0, True, True)
    fmt_only = compute_reward("format_answer", "<think>x</think><answer>A</answer>", "B")
    assert (fmt_only.score, fmt_only.format_ok, fmt_only.answer_ok) == (1.0, True, False)
    # Right answer, no tags: r_ans still counts (the parts are independent).
    ans_only = compute_reward("format_answer", "<think>x</think>The correct answer is (B)", "B")
    assert (ans_only.score, ans_only.format_ok, ans_only.answer_ok) == (1.0, False, True)
    neither = compute_reward("format_answer", "B", "B")
    assert neither.score == 0.0
    qa = compute_reward("format_answer", "<think>x</think><answer>Paris</answer>", ["paris"])
    assert qa.score == 2.0
    # Gold "C" reads as a letter; forcing free-form QA matches a lower-case "c".
    lower = "<think>x</think><answer>c</answer>"
    assert compute_reward("format_answer", lower, "C").score == 1.0
    assert compute_reward("format_answer", lower, "C", answer_type="qa").score == 2.0


def test_registry_and_unknown_name():
    assert set(REWARD_FNS) == {"format", "answer_mc", "answer_qa", "answer_number", "format_answer"}
    with pytest.raises(ValueError, match="answer_mc, answer_number, answer_qa, format"):
        compute_reward("accuracy", "x", "y")


def test_docqa_rows_reach_the_reward_with_the_answer_their_prompt_asks_for():
    from megatron_longact.data.prompts import gold_answer, user_message
    from megatron_longact.data.rl_data import docqa_record

    def row(source, question, ground_truth):
        content = (f"Please read the following text and answer the question below.\n\n<text>\n"
                   f"doc\n</text>\n\n{question}\n\nFormat your response as follows: ...")  # fmt: skip
        return {"data_source": source, "prompt": [{"role": "user", "content": content}],
                "reward_model": {"ground_truth": ground_truth}, "extra_info": {"index": 0}}  # fmt: skip

    mc = docqa_record(row("long_toc_choices_1", "What is the correct answer to this question: "
                          "Which?\nChoices:\n(A) x\n(B) y\n(C) z\n(D) w",
                          "The correct answer is (C)"))  # fmt: skip
    assert "the letter of the correct choice" in user_message(mc, mc.context)
    tagged = "<think>z is right</think><answer>C</answer>"
    assert compute_reward("format_answer", tagged, gold_answer(mc)).score == 2.0
    assert (
        compute_reward(
            "format_answer", "<think>.</think><answer>z</answer>", gold_answer(mc)
        ).answer_ok
        is False
    )  # the option text is not the letter
    math = docqa_record(row("docmath_1", "How much?", "Therefore, the answer is 1,250."))
    assert "give the number" in user_message(math, math.context)
    assert compute_reward("format_answer", "<think>.</think><answer>1250</answer>",
                          gold_answer(math)).score == 2.0  # fmt: skip
    yes = docqa_record(row("multihoprag_1", "Is it?", "yes"))
    assert "yes/no" in user_message(yes, yes.context)
    assert compute_reward("format_answer", "<think>.</think><answer>Yes</answer>",
                          gold_answer(yes)).score == 2.0  # fmt: skip
