"""Stop conditions (vLLM's stop-string semantics), the device stop table, and how rollouts are
shared over DP x CP replicas. Pure functions; the engine itself is in test_rollout_native.py."""

from __future__ import annotations

import pytest
import torch

from megatron_longact.data.tokenizer import TINY_TOKENIZER_DIR, load_tokenizer
from megatron_longact.rl.experience import replica_share
from megatron_longact.rl.rollout.stops import (
    StopTable,
    first_text_stop,
    resolve_stop_conditions,
    response_text,
    tail_tokens,
    truncate_at_stop,
)


def test_truncate_at_stop_follows_vllm_check_stop_strings():
    # vllm v0.10.2 engine/output_processor/stop_checker.py check_stop_strings (~95-131) with
    # include_in_output=True: search the last new_char_count + len(stop) - 1 characters, stop
    # strings in list order, cut after the match.
    assert truncate_at_stop("x</answer>", new_char_count=3, stop_strings=["</answer>"]) == (
        "x</answer>"
    )
    assert truncate_at_stop("x</answer>\n", new_char_count=3, stop_strings=["</answer>"]) == (
        "x</answer>"
    )
    # A match that ended before the new characters is not this step's (it would have stopped).
    assert truncate_at_stop("</answer> more", new_char_count=2, stop_strings=["</answer>"]) == (
        "</answer> more"
    )
    # List order wins over position, as in vLLM.
    assert truncate_at_stop("a STOP b END", new_char_count=12, stop_strings=["END", "STOP"]) == (
        "a STOP b END"
    )
    assert truncate_at_stop("ab", new_char_count=0, stop_strings=["b"]) == "ab"


def test_resolve_splits_single_and_multi_token_strings():
    tok = load_tokenizer(TINY_TOKENIZER_DIR)
    stops = resolve_stop_conditions(tok, ["</answer>", " answer is"])
    answer_close = tok.encode("</answer>", add_special_tokens=False)
    assert len(answer_close) == 1 and answer_close[0] in stops.token_ids
    assert tok.eos_token_id in stops.token_ids
    assert stops.sequences == (tuple(tok.encode(" answer is", add_special_tokens=False)),)
    assert stops.strings == ("</answer>", " answer is")
    with pytest.raises(ValueError, match="rl.stop_strings"):
        resolve_stop_conditions(tok, [""])


def test_stop_table_matches_token_and_sequence_ends_only():
    table = StopTable([7], [(3, 4, 5)], device="cpu")
    ng = -2
    window = torch.tensor([
        [1, 2, 7],        # stop token
        [3, 4, 5],        # stop sequence
        [4, 5, 3],        # sequence not at the end
        [ng, 4, 5],       # sequence cut by the prompt boundary
        [ng, ng, 7],      # first generated token is a stop token
    ])  # fmt: skip
    assert table.matches(window).tolist() == [True, True, False, False, True]
    assert not StopTable([], [], device="cpu").matches(window).any()


def test_first_text_stop_finds_the_exact_token():
    tok = load_tokenizer(TINY_TOKENIZER_DIR)
    ids = tok.encode("The answer is <answer>42</answer> ok", add_special_tokens=False)

    def decode(x):
        return tok.decode(x, skip_special_tokens=False)

    window = tail_tokens(["swer is"])
    # "swer is" is no token sequence of its own: only the decoded text shows it.
    end = first_text_stop(decode, ids, stop_strings=["swer is"], first=0, window=window)
    assert decode(ids[:end]).endswith(" answer is") and "swer is" not in decode(ids[: end - 1])
    assert first_text_stop(decode, ids, stop_strings=["swer is"], first=end, window=window) is None
    text = response_text(tok, ids[:end], stop_strings=["swer is"])
    assert text == "The answer is"


@pytest.mark.parametrize("dp,cp", [(1, 1), (2, 1), (1, 2), (2, 2), (3, 4)])
def test_replica_share_covers_every_rollout_once(dp, cp):
    num_records, rollouts = 5, 3
    shares = [
        replica_share(num_records, rollouts_per_prompt=rollouts, dp=dp, dp_rank=d, cp=cp,
                      cp_rank=c)
        for d in range(dp)
        for c in range(cp)
    ]  # fmt: skip
    pairs = [p for share in shares for p in share]
    assert sorted(pairs) == [(i, k) for i in range(num_records) for k in range(rollouts)]
    sizes = [len(s) for s in shares]
    assert max(sizes) - min(sizes) <= rollouts  # balanced within DP by whole prompts
    # At CP = 1 the split is the old one: whole prompt groups round-robin over DP.
    if cp == 1:
        assert shares[0] == [(i, k) for i in range(0, num_records, dp) for k in range(rollouts)]


def test_bad_stop_strings_fail_at_config_load_and_rl_start():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    from megatron_longact.config import JobConfig, load_config

    with pytest.raises(ValueError, match=r"rl.stop_strings: '' is not a non-empty string"):
        load_config(JobConfig, None, ['rl.stop_strings=[""]'])
    # A word-level vocabulary writes unknown words as [UNK]: the string can never be generated
    # (and its token sequence would stop on any unknown word). setup_rl calls this first.
    words = Tokenizer(WordLevel({"[UNK]": 0, "answer": 1, "done": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]")
    assert resolve_stop_conditions(tok, ["done"]).token_ids[-1] == 2
    with pytest.raises(ValueError, match="no response can contain it"):
        resolve_stop_conditions(tok, ["</answer>"])
