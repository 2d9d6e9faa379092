"""Export a megatron checkpoint (any TP/PP) to a Hugging Face model folder.

    python tools/convert_megatron_to_hf.py --load runs/rl/checkpoints --out Qwen3-8B-longact

Same as ``longact convert --direction mcore2hf``; see docs/convert.md.
"""

import sys

from megatron_longact.convert.cli import main

if __name__ == "__main__":
    sys.exit(main(["--direction", "mcore2hf", *sys.argv[1:]]))
