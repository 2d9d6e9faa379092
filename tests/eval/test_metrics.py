"""Scorers on hand-made cases following each benchmark's official rule."""

from __future__ import annotations

import pytest

from megatron_longact.eval.metrics import (
    exact_match,
    first_int,
    lcs_length,
    normalize_answer,
    normalize_zh_answer,
    rouge_l,
    rouge_lsum,
    rouge_tokenize,
    ruler_postprocess,
    string_match_all,
    string_match_part,
    strip_thinking,
    token_f1,
    zh_char_f1,
)
from megatron_longact.eval.tokens import truncate_middle


def test_squad_normalization_drops_case_punctuation_articles_and_spaces():
    assert normalize_answer("  The Eiffel-Tower, in   Paris!  ") == "eiffeltower in paris"
    assert normalize_answer("An apple a day") == "apple day"


def test_token_f1_is_bag_of_words_f1_max_over_references():
    # pred {eiffel, tower, paris} vs ref {eiffel, tower}: P = 2/3, R = 1 -> F1 = 0.8
    assert token_f1("The Eiffel Tower, Paris", "Eiffel Tower") == pytest.approx(0.8)
    assert token_f1("Paris", ["London", "paris."]) == pytest.approx(1.0)
    assert token_f1("nothing shared", ["Eiffel Tower"]) == 0.0
    # repeated tokens count with multiplicity: common = min counts = 1
    assert token_f1("cat cat", "cat") == pytest.approx(2 * 0.5 * 1 / 1.5)


def test_chinese_f1_is_character_level_after_removing_punctuation():
    assert normalize_zh_answer("北京 是首都。") == "北京是首都"
    assert zh_char_f1("北京是首都。", "首都是北京") == pytest.approx(1.0)  # same characters
    # pred 北京市 vs ref 北京: common 2, P = 2/3, R = 1 -> F1 = 0.8
    assert zh_char_f1("北京市", ["上海", "北京"]) == pytest.approx(0.8)
    assert zh_char_f1("上海", "北京") == 0.0


def test_exact_match_uses_squad_normalization():
    assert exact_match("The Beatles.", ["beatles"]) == 1.0
    assert exact_match("Beatles band", ["beatles"]) == 0.0


def test_lcs_and_rouge_l_against_hand_computed_values():
    a = "the cat sat on the mat".split()
    b = "the cat is on the mat".split()
    assert lcs_length(a, b) == 5  # the cat on the mat
    assert rouge_l("the cat sat on the mat", "The cat is on the mat.") == pytest.approx(5 / 6)
    # pred [a b c d], ref [b d e]: LCS 2, P = 1/2, R = 2/3 -> F = 4/7
    assert rouge_l("a b c d", "b d e") == pytest.approx(4 / 7)
    assert rouge_l("", "b d e") == 0.0


def test_rouge_tokenizer_matches_rouge_score_defaults():
    assert rouge_tokenize("Hello, World! It's 42-ish café") == [
        "hello",
        "world",
        "it",
        "s",
        "42",
        "ish",
        "caf",
    ]


def test_rouge_lsum_uses_union_lcs_over_newline_sentences():
    # Sentence order swapped: sentence-level LCS finds 2 of 4, the summary-level union all 4.
    assert rouge_l("c d\na b", "a b\nc d") == pytest.approx(0.5)
    assert rouge_lsum("c d\na b", "a b\nc d") == pytest.approx(1.0)
    # ref [a b c] [d e], pred [a c] [d x e]: hits a, c, d, e -> P = R = 4/5
    assert rouge_lsum("a c\nd x e", "a b c\nd e") == pytest.approx(0.8)
    # a hit is consumed: 'a' twice in the reference but once in the prediction
    assert rouge_lsum("a", "a\na") == pytest.approx(2 * 1.0 * 0.5 / 1.5)


def test_ruler_string_match_all_and_part():
    assert string_match_all("The numbers are 123 and 456.", ["123", "456", "789"]) == pytest.approx(
        2 / 3
    )
    assert string_match_all("ALPHA-beta", ["alpha-BETA"]) == 1.0  # case-insensitive
    assert string_match_part("It is paris", ["Paris", "France"]) == 1.0
    assert string_match_part("It is Lyon", ["Paris", "France"]) == 0.0
    with pytest.raises(ValueError):
        string_match_all("x", [])


def test_ruler_postprocess_replaces_control_characters():
    assert ruler_postprocess("  a\tb\x00c \n") == "a\nb\nc"


def test_first_int_takes_the_first_digit_run():
    assert first_int(" The pass key is 71432.") == "71432"
    assert first_int("7143 2") == "7143"
    assert first_int("00846") == "00846"  # leading zeros kept: labels are strings
    assert first_int("no digits") == ""


def test_strip_thinking_keeps_text_after_the_last_think_close():
    assert strip_thinking("<think>a</think>b</think> final") == " final"
    assert strip_thinking("no reasoning") == "no reasoning"


def test_truncate_middle_keeps_head_and_tail_as_the_official_rule(ws_codec):
    text = " ".join(str(i) for i in range(20))
    # budget 5: official ids[:5//2] + ids[-5//2:] = 2 head + 3 tail tokens
    assert truncate_middle(text, max_tokens=5, codec=ws_codec) == "0 1 17 18 19"
    assert truncate_middle(text, max_tokens=6, codec=ws_codec) == "0 1 2 17 18 19"
    assert truncate_middle(text, max_tokens=50, codec=ws_codec) == text
