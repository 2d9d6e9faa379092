"""Loading Hugging Face tokenizers from local folders, and building the tiny test tokenizer.

The tiny tokenizer is a byte-level BPE (Qwen2-style pre-tokenizer: digits split one per token,
words keep their leading space) trained offline on the synthetic task's text, with Qwen's
ChatML special tokens and the reasoning tags as single tokens. A built copy is committed at
:data:`TINY_TOKENIZER_DIR`; rebuild it with ``python tools/build_tiny_tokenizer.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from megatron_longact.data.synthetic import tokenizer_training_text
from megatron_longact.errors import UserError

TINY_TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny_tokenizer"

ENDOFTEXT = "<|endoftext|>"  # pad and eos, as in Qwen2 base models
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
# Reasoning tags are ordinary (non-special) added tokens, as in Qwen3: single ids, but kept by
# decode(skip_special_tokens=True) so reward functions can find them in rollouts.
REASONING_TAGS = ("<think>", "</think>", "<answer>", "</answer>")

DEFAULT_TINY_VOCAB_SIZE = 1024
DEFAULT_TRAINING_LINES = 20_000
DEFAULT_TRAINING_SEED = 0

# Qwen2's pre-tokenization regex: contractions, letter runs with one leading non-letter, single
# digits, punctuation runs, newlines, whitespace.
_PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen-style ChatML without Qwen's default system prompt: every message is
# "<|im_start|>{role}\n{content}<|im_end|>\n". chat.tokenize_conversation mirrors it exactly.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def load_tokenizer(path: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """Load a Hugging Face tokenizer from a local folder; never downloads.

    Args:
        path: a folder holding ``tokenizer.json`` / ``tokenizer_config.json`` (a model
            checkpoint folder or :data:`TINY_TOKENIZER_DIR`).

    Raises:
        FileNotFoundError: the folder or its tokenizer files are missing.
    """
    path = Path(path)
    hint = (
        "Point the config at a local Hugging Face model folder, or build the tiny tokenizer "
        "with `python tools/build_tiny_tokenizer.py --out-dir DIR`."
    )
    if not path.is_dir():
        raise FileNotFoundError(f"Tokenizer folder not found: {path}. {hint}")
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise FileNotFoundError(f"No tokenizer.json or tokenizer_config.json in {path}. {hint}")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _new_bpe_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def build_tiny_tokenizer(
    out_dir: str | os.PathLike[str],
    *,
    vocab_size: int = DEFAULT_TINY_VOCAB_SIZE,
    num_training_lines: int = DEFAULT_TRAINING_LINES,
    seed: int = DEFAULT_TRAINING_SEED,
) -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE tokenizer offline and save it in Hugging Face format.

    The vocabulary is at most ``vocab_size`` (256 byte symbols, 3 special tokens, 4 tags, then
    merges learned from :func:`~megatron_longact.data.synthetic.tokenizer_training_text`); it
    may stop short when no pair is frequent enough. Ids 0-6 are, in order, ``<|endoftext|>``,
    ``<|im_start|>``, ``<|im_end|>``, ``<think>``, ``</think>``, ``<answer>``, ``</answer>``.
    The result loads with ``AutoTokenizer.from_pretrained(out_dir)``.
    """
    min_vocab = 256 + len(SPECIAL_TOKENS) + len(REASONING_TAGS)
    if vocab_size < min_vocab:
        raise UserError(
            f"vocab_size={vocab_size} is below the {min_vocab} entries a byte-level BPE with "
            f"these special tokens needs; use at least {min_vocab}."
        )
    tokenizer = _new_bpe_tokenizer()
    reserved = [*SPECIAL_TOKENS, *REASONING_TAGS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in reserved],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(
        tokenizer_training_text(num_lines=num_training_lines, seed=seed), trainer=trainer
    )
    # The trainer registers every reserved token as special; re-register the tags as
    # non-special (same ids) so decode(skip_special_tokens=True) keeps them.
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in REASONING_TAGS])

    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        model_max_length=1 << 20,
    )
    hf_tokenizer.chat_template = CHATML_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_tokenizer.save_pretrained(str(out_dir))
    # transformers 5 records its own class name, which 4.x cannot resolve; the generic name
    # loads the same tokenizer in both.
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return hf_tokenizer


def pad_id(tokenizer) -> int:
    """The id that pads token rows: the tokenizer's pad token, else 0 (padding is always
    masked out of losses and attention, so any id works)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
