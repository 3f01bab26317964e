"""Where one worker of a distillation run sits: rank, world size, device, how it reports.

``WorkerContext`` is the one thing the loop (``trainers.distill``) knows of its surroundings.
``ray_context`` builds it inside a Ray Train worker (reports and checkpoints go through
``ray.train``; Ray is imported inside the function, so this module imports without Ray);
``bare_context`` builds it for a run without Ray (unit tests, benchmarks), which keeps its own
checkpoints under ``out_dir/checkpoints``. ``gather_with_grad`` / ``gather_no_grad`` are the
collectives the loop needs across workers, and ``process_started_unix`` dates the worker's
process so a trial's start-up can be split into its parts.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from trainers.run_config import DistillConfig

# Called at each eval as report(metrics, checkpoint_dir or None).
Report = Callable[[dict[str, Any], str | None], None]


@dataclass
class WorkerContext:
    """Where this worker sits and how it reports; built from Ray Train or for a bare run."""

    rank: int
    world_size: int
    device: torch.device
    report: Report
    resume_dir: str | None  # a checkpoint directory to resume from, or None
    checkpoint_root: Path | None  # bare runs keep checkpoints here; Ray keeps its own


def ray_context() -> WorkerContext:
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    checkpoint = ray.train.get_checkpoint()
    resume_dir = None
    if checkpoint is not None:
        # Copy to a local dir that outlives the context manager; checkpoints are small.
        resume_dir = checkpoint.to_directory(tempfile.mkdtemp(prefix="conaclip-resume-"))
    return WorkerContext(
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        device=ray.train.torch.get_device(),
        report=report,
        resume_dir=resume_dir,
        checkpoint_root=None,
    )


def bare_context(cfg: DistillConfig, report: Report, resume_from: str | None) -> WorkerContext:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    root = Path(cfg.out_dir or tempfile.mkdtemp(prefix="conaclip-run-")) / "checkpoints"
    if resume_from is None and root.is_dir():
        existing = sorted(root.glob("step_*"))
        resume_from = str(existing[-1]) if existing else None
    return WorkerContext(0, 1, device, report, resume_from, root)


def process_started_unix() -> float:
    """Wall-clock (Unix seconds) at which this process started; from /proc on Linux (the
    kernel's start tick plus boot time), the current time where /proc is missing."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
    except (OSError, StopIteration, IndexError, ValueError):
        return time.time()
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def gather_with_grad(tensor: Tensor) -> Tensor:
    """All ranks' rows, in rank order; gradient flows back to every rank's own rows."""
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(tensor), dim=0)


def gather_no_grad(tensor: Tensor) -> Tensor:
    """All ranks' rows, in rank order, without gradient (the teacher side)."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)
