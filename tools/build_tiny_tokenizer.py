"""Build the tiny byte-level BPE tokenizer used by tests and CPU runs.

python tools/build_tiny_tokenizer.py                      # rebuild the committed copy
python tools/build_tiny_tokenizer.py --out-dir /tmp/tok --vocab-size 768
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_longact.data.tokenizer import (
    DEFAULT_TINY_VOCAB_SIZE,
    DEFAULT_TRAINING_LINES,
    DEFAULT_TRAINING_SEED,
    TINY_TOKENIZER_DIR,
    build_tiny_tokenizer,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=TINY_TOKENIZER_DIR)
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=DEFAULT_TINY_VOCAB_SIZE,
        help="upper bound; training stops early when no pair is frequent",
    )
    parser.add_argument(
        "--num-lines", type=int, default=DEFAULT_TRAINING_LINES, help="synthetic training lines"
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_TRAINING_SEED)
    args = parser.parse_args(argv)
    tokenizer = build_tiny_tokenizer(
        args.out_dir, vocab_size=args.vocab_size, num_training_lines=args.num_lines, seed=args.seed
    )
    print(f"Wrote a tokenizer with {len(tokenizer)} tokens to {args.out_dir}")


if __name__ == "__main__":
    main()
