"""Write the synthetic key-value retrieval data sets (SFT and RL, train and val) as JSONL.

    longact data --out-dir data/synthetic --context-tokens 1024

Writes sft_train.jsonl, sft_val.jsonl, rl_train.jsonl and rl_val.jsonl. Split ``name`` uses
seed ``--seed + SPLIT_SEED_OFFSETS[name]``, so its file equals ``make_sft_records`` /
``make_rl_records(id_prefix=name)`` with that seed and does not depend on the other splits.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from rich.progress import Progress

from megatron_longact.data.jsonl import write_jsonl
from megatron_longact.data.synthetic import DEFAULT_NUM_FACTS, iter_tasks, rl_record, sft_record
from megatron_longact.data.tokenizer import TINY_TOKENIZER_DIR, load_tokenizer

SPLIT_SEED_OFFSETS = {"sft_train": 0, "sft_val": 1, "rl_train": 2, "rl_val": 3}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="longact data", description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=TINY_TOKENIZER_DIR,
        help="local tokenizer folder used to measure the context length",
    )
    parser.add_argument(
        "--context-tokens",
        type=int,
        default=1024,
        help="document length in tokens (the prompt and reply add about 70)",
    )
    parser.add_argument("--num-facts", type=int, default=DEFAULT_NUM_FACTS)
    parser.add_argument("--sft-train", type=int, default=2000, help="number of samples")
    parser.add_argument("--sft-val", type=int, default=100, help="number of samples")
    parser.add_argument("--rl-train", type=int, default=1000, help="number of samples")
    parser.add_argument("--rl-val", type=int, default=100, help="number of samples")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)

    tokenizer = load_tokenizer(args.tokenizer)
    sizes = {
        "sft_train": args.sft_train,
        "sft_val": args.sft_val,
        "rl_train": args.rl_train,
        "rl_val": args.rl_val,
    }
    with Progress() as progress:
        for name, num_samples in sizes.items():
            bar = progress.add_task(name, total=num_samples)
            tasks = iter_tasks(
                context_tokens=args.context_tokens,
                tokenizer=tokenizer,
                seed=args.seed + SPLIT_SEED_OFFSETS[name],
                num_facts=args.num_facts,
            )
            records = []
            for index, task in enumerate(itertools.islice(tasks, num_samples)):
                is_sft = name.startswith("sft")
                records.append(
                    sft_record(task) if is_sft else rl_record(task, record_id=f"{name}-{index}")
                )
                progress.advance(bar)
            path = args.out_dir / f"{name}.jsonl"
            write_jsonl(path, records)
            progress.console.print(f"wrote {len(records)} records to {path}")
    return 0


if __name__ == "__main__":
    main()
