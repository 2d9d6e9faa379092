"""Import a Hugging Face model folder into a megatron checkpoint.

    python tools/convert_hf_to_megatron.py --hf-dir Qwen3-8B --out ckpt/qwen3-8b --tp 2

Same as ``longact convert --direction hf2mcore``; see docs/convert.md.
"""

import sys

from megatron_longact.convert.cli import main

# The guard matters: local ranks are spawned and re-import this file.
if __name__ == "__main__":
    sys.exit(main(["--direction", "hf2mcore", *sys.argv[1:]]))
