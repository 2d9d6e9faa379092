"""Shared fixtures. Distributed tests spawn real gloo processes via runtime.launch.run_local."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
