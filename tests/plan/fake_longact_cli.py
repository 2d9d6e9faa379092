"""Stand-in for ``python -m megatron_longact.cli`` in the launch-script tests.

Each process appends how it was started (argv, torch.distributed env) to
``$FAKE_CLI_LOG_DIR/<subcommand>.rank<RANK>.jsonl``. ``FAKE_CLI_FAIL=<sub>`` makes that stage
exit 3; ``FAKE_CLI_BLOCK=<sub>`` makes it wait for SIGUSR1, record it, and exit 75 the way the
real CLI does after its stop checkpoint (``runtime.signals.STOP_EXIT_CODE``).
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

BLOCK_LIMIT_S = 120.0


def main() -> int:
    log_dir = Path(os.environ["FAKE_CLI_LOG_DIR"])
    subcommand = sys.argv[1]
    rank = int(os.environ.get("RANK", "0"))
    record = {
        "argv": sys.argv[1:],
        "rank": rank,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
        "master_port": os.environ.get("MASTER_PORT"),
        "longact_device": os.environ.get("LONGACT_DEVICE"),
        "cuda_device_max_connections": os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS"),
    }
    with (log_dir / f"{subcommand}.rank{rank}.jsonl").open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    if os.environ.get("FAKE_CLI_FAIL") == subcommand:
        return 3
    if os.environ.get("FAKE_CLI_BLOCK") == subcommand:

        def on_usr1(signum, frame):
            (log_dir / f"{subcommand}.rank{rank}.usr1").write_text("checkpointed\n")
            sys.exit(75)

        signal.signal(signal.SIGUSR1, on_usr1)
        (log_dir / f"{subcommand}.rank{rank}.ready").write_text("")
        deadline = time.monotonic() + BLOCK_LIMIT_S
        while time.monotonic() < deadline:
            time.sleep(0.05)
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
