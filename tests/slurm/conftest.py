"""Registers the ``slurm`` marker here, so ``pytest -m slurm`` selects these tests without a
pyproject entry."""


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: submits real jobs to a running Slurm cluster")
