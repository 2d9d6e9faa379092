"""Metrics sinks: TensorBoard (always, rank 0), Weights & Biases (optional), console."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch.distributed as dist

from megatron_longact.config.schema import JobConfig
from megatron_longact.errors import UserError

logger = logging.getLogger(__name__)


def tensorboard_dir(job: JobConfig) -> str | None:
    """``logging.tensorboard_dir``, else ``<save_dir>/../tensorboard``, else no logging."""
    if job.logging.tensorboard_dir:
        return job.logging.tensorboard_dir
    if job.checkpoint.save_dir:
        return str(Path(job.checkpoint.save_dir).parent / "tensorboard")
    return None


class MetricsWriter:
    """Writes scalar dicts to TensorBoard, ``metrics.jsonl`` and optionally W&B, on rank 0 only.

    Every rank may call :meth:`log`; non-zero ranks do nothing, so loops need no rank checks.
    """

    def __init__(
        self,
        log_dir: str | Path | None,
        *,
        wandb_project: str | None = None,
        run_name: str = "longact",
        config: dict | None = None,
    ):
        self.enabled = (not dist.is_initialized() or dist.get_rank() == 0) and log_dir is not None
        self.tb = None
        self.wandb = None
        self.jsonl = None
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self.tb = SummaryWriter(log_dir=str(log_dir))
        self.jsonl = open(Path(log_dir) / "metrics.jsonl", "a")  # noqa: SIM115
        if wandb_project:
            try:
                import wandb
            except ImportError as err:
                raise UserError(
                    "logging.wandb_project is set but wandb is not installed: "
                    "pip install -e '.[wandb]'"
                ) from err
            self.wandb = wandb.init(project=wandb_project, name=run_name, config=config)

    def log(self, metrics: dict[str, float], *, step: int) -> None:
        """Records ``metrics`` (name -> number) at ``step``."""
        if not self.enabled:
            return
        for name, value in metrics.items():
            self.tb.add_scalar(name, value, step)
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()


class Progress:
    """A rich progress bar on rank 0 (a no-op elsewhere or when disabled)."""

    def __init__(self, total: int, *, description: str, enabled: bool = True, start: int = 0):
        self.bar = None
        if enabled and (not dist.is_initialized() or dist.get_rank() == 0):
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
            )
            self.task = self.bar.add_task(description, total=total, completed=start, info="")

    def __enter__(self) -> Progress:
        if self.bar is not None:
            self.bar.start()
        return self

    def update(self, *, advance: int = 1, info: str = "") -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=advance, info=info)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
