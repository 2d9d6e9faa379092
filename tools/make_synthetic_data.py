"""Same as ``longact data``: write the synthetic SFT/RL data sets (see its --help)."""

import sys

from megatron_longact.data.make_synthetic import main

if __name__ == "__main__":
    sys.exit(main())
