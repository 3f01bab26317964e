"""Launching one Ray Train ``TorchTrainer`` for a DistillConfig: alone (`conaclip train`) or as
the body of a Ray Tune function trainable (the Ray 2.x way to run Train inside Tune)."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from trainers.run_config import DistillConfig

# Ray Train's controller polls its workers this often (Ray's default is 2 s): a trial's last
# report and its end are noticed up to one interval late, which on a trial of a minute is a
# few percent of it (benchmarks/trial_startup.py). A poll is one small actor call.
HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
HEALTH_CHECK_INTERVAL_S = 0.25

PROGRESS_KEYS = ("step", "loss", "rsum", "t2i_R1", "i2t_R1", "samples_per_s", "skipped_samples")


class ScalingSpec(BaseModel):
    """How many Ray Train workers a trial uses and what each one holds."""

    model_config = ConfigDict(extra="forbid")

    num_workers: int = Field(default=1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0)
    gpus_per_worker: float = Field(default=0.0, ge=0)
    max_failures: int = Field(default=1, ge=-1, description="worker-group restarts; -1 = always")

    def resources_per_worker(self) -> dict[str, float]:
        resources = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            resources["GPU"] = self.gpus_per_worker or 1.0
        return resources

    def trial_resources(self) -> dict[str, float]:
        """Resources one whole trial occupies (Train workers; the Tune driver task takes none)."""
        per_worker = self.resources_per_worker()
        return {key: value * self.num_workers for key, value in per_worker.items()}


def format_progress(metrics: dict[str, Any], total_steps: int | None = None) -> str:
    """One line per report: ``step 100/300  loss 2.31  rsum 123.4 ...``."""
    parts = []
    for key in PROGRESS_KEYS:
        if key not in metrics:
            continue
        value = metrics[key]
        if key == "step" and total_steps:
            parts.append(f"step {value}/{total_steps}")
        elif isinstance(value, float):
            parts.append(f"{key} {value:.4g}")
        else:
            parts.append(f"{key} {value}")
    return "  ".join(parts)


def _progress_callback(total_steps: int, history_file: Path | None, prefix: str):
    from ray.train import UserCallback

    class ProgressLines(UserCallback):
        """Prints each report and appends it to a JSONL history (runs on the controller)."""

        def after_report(self, run_context, metrics, checkpoint) -> None:
            rank0 = dict(metrics[0]) if metrics else {}
            print(f"{prefix}{format_progress(rank0, total_steps)}", flush=True)
            if history_file is not None:
                history_file.parent.mkdir(parents=True, exist_ok=True)
                with history_file.open("a") as handle:
                    handle.write(json.dumps({"time": time.time(), **rank0}) + "\n")

    return ProgressLines()


def make_torch_trainer(
    cfg: DistillConfig,
    scaling: ScalingSpec,
    run_name: str,
    storage_path: str | Path,
    callbacks: list | None = None,
    progress: bool = True,
    history_file: Path | None = None,
    train_loop: Callable[[dict[str, Any]], Any] | None = None,
):
    """A TorchTrainer that runs ``train_loop_per_worker`` with ``cfg`` on ``scaling`` workers.

    Checkpoints (newest two kept) and Ray's run state live in ``storage_path/run_name``; a
    failed worker group restarts from the newest checkpoint up to ``max_failures`` times.
    DDP uses gloo on CPU and nccl on GPU (Ray's TorchConfig default).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from trainers.distill import train_loop_per_worker

    # Read by fit() in this process and passed on to the controller; a user's value wins.
    os.environ.setdefault(HEALTH_CHECK_ENV, str(HEALTH_CHECK_INTERVAL_S))
    all_callbacks = list(callbacks or [])
    if progress:
        all_callbacks.append(_progress_callback(cfg.steps, history_file, prefix=""))
    return TorchTrainer(
        train_loop or train_loop_per_worker,
        train_loop_config=cfg.model_dump(mode="json"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker=scaling.resources_per_worker(),
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=str(Path(storage_path).resolve()),
            failure_config=ray.train.FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=all_callbacks,
        ),
    )


def fit_or_raise(trainer) -> Any:
    """``trainer.fit()``; a worker error surfaces as one line naming the run and its error."""
    import ray.train

    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as error:
        message = str(error).strip().splitlines()
        summary = message[-1] if message else repr(error)
        print(f"conaclip: training failed: {summary}", file=sys.stderr)
        raise


def distill_trial(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: one (pair set, seed) as one TorchTrainer run.

    config (from the ablation's param space): ``pair_set`` and ``seed`` (grid axes),
    ``pair_sets`` (name -> pair dicts), ``run`` (the DistillConfig template), ``scaling``,
    ``train_storage``. The Train run is named after the Tune trial id, which survives
    ``Tuner.restore``: a restored trial finds its Train run's checkpoints and resumes there.
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from trainers.run_config import load_distill_config

    trial_id = ray.tune.get_context().get_trial_id()
    run = {**config["run"], "pairs": config["pair_sets"][config["pair_set"]]}
    run["seed"] = config["seed"]
    cfg = load_distill_config(run, source=f"trial {config['pair_set']} seed {config['seed']}")
    trainer = make_torch_trainer(
        cfg,
        ScalingSpec(**config["scaling"]),
        run_name=f"trial-{trial_id}",
        storage_path=config["train_storage"],
        callbacks=[TuneReportCallback()],
        progress=False,
    )
    trainer.fit()
