"""Launching one Ray Train ``TorchTrainer`` for a DistillConfig: alone (`conaclip train`) or as
the body of a Ray Tune function trainable (the Ray 2.x way to run Train inside Tune)."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from orchestrator.scoped_env import scoped_env
from trainers.run_config import DistillConfig

# Ray Train's controller polls its workers this often (Ray's default is 2 s): a trial's last
# report and its end are noticed up to one interval late, which on a trial of a minute is a
# few percent of it (benchmarks/trial_startup.py). A poll is one small actor call.
HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
HEALTH_CHECK_INTERVAL_S = 0.25

# How long one attempt to get a worker group's placement group may wait before Ray Train gives
# up on it and its controller tries again (Ray's default is 60 s). Ray Train's controller
# retries such startup timeouts without limit by default (FailureConfig's
# controller_failure_limit = -1): a trial whose resources never free up waits forever and
# prints nothing. ScalingSpec.start_timeout_s bounds the attempts together instead.
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
START_ATTEMPT_S = 60.0
# How long a trial whose Train worker stopped answering waits for the GCS to say whether the
# worker's node died. The GCS declares a node dead after health_check_failure_threshold (5)
# missed checks health_check_period_ms (3 s) apart: about 15 s with Ray's defaults.
NODE_DEATH_WAIT_S = 30.0
PROGRESS_KEYS = ("step", "loss", "rsum", "t2i_R1", "i2t_R1", "samples_per_s", "skipped_samples")


class ScalingSpec(BaseModel):
    """How many Ray Train workers a trial uses and what each one holds."""

    model_config = ConfigDict(extra="forbid")

    num_workers: int = Field(default=1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0)
    gpus_per_worker: float = Field(default=0.0, ge=0)
    max_failures: int = Field(default=1, ge=-1, description="worker-group restarts; -1 = always")
    start_timeout_s: float = Field(
        default=600.0,
        gt=0,
        description="longest a trial waits for its workers' resources before it fails",
    )
    device: Literal["auto", "cpu"] = Field(
        default="auto",
        description="auto: train on what Ray Train hands each worker (its GPU when it holds "
        "one); cpu: train on CPU while still holding the GPU share, to check GPU scheduling "
        "(packing, waiting) on a machine without CUDA",
    )

    def start_attempts(self) -> tuple[float, int]:
        """(seconds one placement-group attempt waits, attempts): together about
        ``start_timeout_s``, each at most Ray's own 60 s so that a freed cluster is noticed."""
        user_s = os.environ.get(START_TIMEOUT_ENV)  # read now: set after import still counts
        attempt = float(user_s or min(self.start_timeout_s, START_ATTEMPT_S))
        return attempt, max(1, math.ceil(self.start_timeout_s / attempt - 1e-9))

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
    DDP uses gloo on CPU and nccl on GPU (Ray's TorchConfig default); GPU workers that train
    on CPU (``device: cpu``) use gloo and ``train_on_cpu``.
    """
    import ray.train
    from ray.train.torch import TorchConfig

    from orchestrator.lean_trainer import LeanTorchTrainer
    from trainers.distill import train_loop_per_worker

    # Read by fit() in this process and passed on to the controller; a user's value wins.
    os.environ.setdefault(HEALTH_CHECK_ENV, str(HEALTH_CHECK_INTERVAL_S))
    _, attempts = scaling.start_attempts()
    all_callbacks = list(callbacks or [])
    if progress:
        all_callbacks.append(_progress_callback(cfg.steps, history_file, prefix=""))
    loop = train_loop or train_loop_per_worker
    torch_config = None
    if scaling.use_gpu and scaling.device == "cpu":
        # Ray picks nccl for workers that hold GPUs; a CPU process group needs gloo.
        torch_config = TorchConfig(backend="gloo")
        loop = functools.partial(train_on_cpu, loop)
    return LeanTorchTrainer(
        loop,
        train_loop_config=cfg.model_dump(mode="json"),
        torch_config=torch_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker=scaling.resources_per_worker(),
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=str(Path(storage_path).resolve()),
            failure_config=ray.train.FailureConfig(
                max_failures=scaling.max_failures,
                # Only worker-group startup failures count here (see START_TIMEOUT_ENV).
                controller_failure_limit=attempts - 1,
            ),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=all_callbacks,
        ),
    )


def train_on_cpu(loop: Callable[[dict[str, Any]], Any], config: dict[str, Any]) -> Any:
    """``loop(config)`` in a Train worker that holds GPUs, trained on CPU (``device: cpu``).

    Ray hands the worker its GPU ids (``ray.get_gpu_ids()``, ``CUDA_VISIBLE_DEVICES``) as to
    any GPU worker; only the torch device changes: this process's Ray torch device manager
    becomes the CPU one, so ``ray.train.torch.get_device()`` (what the loop trains on) and
    Ray's own per-device steps are CPU. One line on stdout (the worker's log) says what the
    worker holds and where it trains."""
    import ray
    import ray.train
    from ray.air._internal import device_manager

    # Ray keeps one device manager per process, chosen from the accelerator ids the worker
    # holds (the CUDA one for a GPU); the worker group's start already made it, so replace it.
    with device_manager._torch_device_manager_lock:
        device_manager._torch_device_manager = device_manager.CPUTorchDeviceManager()
    context = ray.train.get_context()
    held = json.dumps([str(gpu) for gpu in ray.get_gpu_ids()])
    print(
        f"conaclip: Train worker rank {context.get_world_rank()} of run "
        f"{context.get_experiment_name()} holds GPU ids {held} (CUDA_VISIBLE_DEVICES="
        f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')}) and trains on cpu (device: cpu)",
        flush=True,
    )
    return loop(config)


def start_timeout_env(scaling: ScalingSpec) -> contextlib.AbstractContextManager[None]:
    """``START_TIMEOUT_ENV`` set to ``scaling``'s attempt while the block runs, then restored.

    Ray Train reads the variable from this process's environment when ``fit()`` starts the
    controller and passes it on. Scoped to one ``fit()`` because one trial actor runs trial
    after trial: a value left behind by one trial would pass for the user's at the next.
    """
    attempt_s, _ = scaling.start_attempts()
    return scoped_env(START_TIMEOUT_ENV, str(attempt_s))


def fit_or_raise(trainer, scaling: ScalingSpec) -> Any:
    """``trainer.fit()`` under ``scaling``'s start bound; a worker error surfaces as one line
    naming the run and its error."""
    import ray.train

    try:
        with start_timeout_env(scaling):
            return trainer.fit()
    except ray.train.TrainingFailedError as error:
        message = str(error).strip().splitlines()
        summary = message[-1] if message else repr(error)
        print(f"conaclip: training failed: {summary}", file=sys.stderr)
        raise


class TrialFailed(Exception):
    """A trial's Train run failed; the message is one line saying why (see failure_line)."""


def _resources_text(resources: dict[str, float], always: tuple[str, ...] = ()) -> str:
    """``CPU 2, memory 10.4 GiB``; zeros left out except for the keys in ``always``."""
    # Ray also lists each placement group's share (CPU_group_<id>) and node markers: noise here.
    shown = {
        k: v
        for k, v in {**dict.fromkeys(always, 0.0), **resources}.items()
        if (v or k in always) and not k.startswith(("node:", "bundle_")) and "_group_" not in k
    }
    # Memory resources are bytes; GiB reads at a glance.
    return ", ".join(
        f"{k} {v / 2**30:.1f} GiB" if k in ("memory", "object_store_memory") else f"{k} {v:g}"
        for k, v in sorted(shown.items())
    )


def _sum(bundles: list[dict[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for bundle in bundles:
        for key, value in bundle.items():
            total[key] = total.get(key, 0.0) + value
    return total


def resources_line(scaling: ScalingSpec) -> str:
    """What a trial asked for, what the cluster has, and what holds it, in one line: the
    placement groups that reserve resources (by name, else id) and what tasks and actors
    outside placement groups use. Read from the GCS (no dashboard needed)."""
    import ray
    from ray.util import placement_group_table

    total, free = ray.cluster_resources(), ray.available_resources()
    per_worker = scaling.resources_per_worker()
    asked = _resources_text(per_worker)
    holders, reserved, waiting = [], [], 0
    for pg_id, pg in placement_group_table().items():
        bundles = list((pg.get("bundles") or {}).values())
        # Only groups holding what the trial asks for (Tune's own per-trial groups hold
        # nothing but a token of memory).
        if not any(_sum(bundles).get(key) for key in scaling.resources_per_worker()):
            continue
        if pg.get("state") == "CREATED":
            reserved.extend(bundles)
            holders.append(f"placement group {pg.get('name') or pg_id[:12]} "
                           f"({_resources_text(_sum(bundles))})")  # fmt: skip
        elif pg.get("state") in ("PENDING", "RESCHEDULING"):
            waiting += 1
    in_groups = _sum(reserved)
    outside = {
        key: total.get(key, 0.0) - free.get(key, 0.0) - in_groups.get(key, 0.0)
        for key in scaling.resources_per_worker()
    }
    if any(v > 1e-9 for v in outside.values()):
        holders.append(f"tasks and actors outside placement groups ({_resources_text(outside)})")
    held = "; ".join(holders) or "nothing (the cluster is smaller than the request)"
    also = f"; {waiting} placement group(s) waiting" if waiting else ""
    return (
        f"asked for {scaling.num_workers} worker(s) x {{{asked}}}; the cluster has "
        f"{{{_resources_text(total)}}} with {{{_resources_text(free, tuple(per_worker))}}} "
        f"free; held by {held}"
        f"{also}"
    )


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def memory_cause(text: str) -> str | None:
    """What Ray's error text says about memory: its memory monitor killed the process
    (OutOfMemoryError, "running low on memory"), or the process died unexpectedly, for which
    Ray names the kernel's OOM killer as the first common cause; None otherwise."""
    lowered = text.lower()
    if "outofmemoryerror" in lowered or "low on memory" in lowered:
        return "out of memory (killed by Ray's memory monitor)"
    if "oom killer" in lowered:
        return (
            "likely out of memory (the process died unexpectedly, for which Ray names the "
            "kernel's OOM killer as the first common cause)"
        )
    return None


def node_cause(text: str) -> str | None:
    """What Ray's error text says about a process whose node died (a lost or released
    machine): its lines naming the node's death and how it ended, as one line; None otherwise."""
    lines = [" ".join(line.split()) for line in text.splitlines()]
    said = [line for line in lines if "node has died" in line or "node was terminated" in line]
    return "; ".join(said)[:300] or None


def _dead_node_reason(node_id: str, wait_s: float) -> str | None:
    """Ray's reason for the death of node ``node_id`` (``ray.nodes()``, read from the GCS),
    waiting up to ``wait_s`` for the GCS to decide; None while it stays alive or is unknown."""
    import ray

    deadline = time.monotonic() + wait_s
    while True:
        node = next((n for n in ray.nodes() if n.get("NodeID") == node_id), None)
        if node is None:
            return None
        if not node.get("Alive", True):
            return node.get("DeathReasonMessage") or "no reason recorded"
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.5)


def lost_node_line(failure: BaseException, wait_s: float | None = None) -> str | None:
    """``node <id> died (<Ray's reason>)`` when ``failure``, a Train worker's health-check
    failure, came from the loss of the worker's node; None otherwise.

    A worker whose node vanishes (a reclaimed or crashed machine) stops answering: the
    controller's poll meets a broken connection (``ActorUnavailableError``), usually before
    the GCS has declared the node dead, so for that error alone the node's state is asked
    for, up to ``wait_s`` (default ``NODE_DEATH_WAIT_S``). A failure that already says its
    node died (``ActorDiedError``) is taken as it is; a worker process that died on a live
    node (killed, out of memory) is an ``ActorDiedError`` too, so it never waits."""
    from ray.exceptions import ActorUnavailableError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    if not isinstance(failure, WorkerHealthCheckFailedError):
        return None
    inner = failure.health_check_failure
    said = node_cause(str(inner))
    if said:
        return said
    # The failure's text names the worker (Ray's "Worker info", with its node_id).
    node = re.search(r"node_id='([0-9a-f]+)'", str(failure))
    if node is None or not isinstance(inner, ActorUnavailableError):
        return None
    reason = _dead_node_reason(node.group(1), NODE_DEATH_WAIT_S if wait_s is None else wait_s)
    return f"node {node.group(1)} died ({reason})" if reason else None


def _memory_detail(text: str) -> str:
    """The sentence of Ray's message that says how much memory was in use or how the
    process exited, else its start."""
    sentences = " ".join(text.split()).split(". ")
    for key in ("memory on the node", "exit detail", "exit type"):
        for sentence in sentences:
            if key in sentence.lower():
                return sentence[:300]
    return " ".join(text.split())[:300]


def failure_line(error: BaseException, scaling: ScalingSpec) -> str:
    """One line for a failed ``TorchTrainer.fit``: resources not had within the bound (with
    ``resources_line``), a worker killed for memory, or the first line of the error."""
    from ray.train import ControllerError, WorkerGroupError
    from ray.train.v2._internal.exceptions import (
        InsufficientClusterResourcesError,
        WorkerGroupStartupTimeoutError,
    )

    if isinstance(error, ControllerError):
        cause = error.controller_failure
        if isinstance(cause, WorkerGroupStartupTimeoutError):
            return (f"no resources within {scaling.start_timeout_s:g} s (start_timeout_s): "
                    f"{resources_line(scaling)}")  # fmt: skip
        if isinstance(cause, InsufficientClusterResourcesError):
            return f"the cluster can never hold this trial: {resources_line(scaling)}"
        memory = memory_cause(f"{type(cause).__name__}: {cause}")
        if memory:  # a worker killed while its group started
            return f"{memory}: {type(cause).__name__}: {_memory_detail(str(cause))}"
        return f"{type(cause).__name__}: {_first_line(cause)}"
    if isinstance(error, WorkerGroupError):
        for rank, failure in sorted(error.worker_failures.items()):
            lost = lost_node_line(failure)
            if lost:
                return f"worker rank {rank} lost with its node: {lost}"
        for rank, failure in sorted(error.worker_failures.items()):
            cause = memory_cause(f"{type(failure).__name__}: {failure}")
            if cause:
                return f"{cause}: worker rank {rank}: {_memory_detail(str(failure))}"
        rank, failure = min(error.worker_failures.items(), key=lambda item: item[0])
        inner = getattr(failure, "health_check_failure", None)
        if inner is not None:  # what the controller's poll of the worker met
            return (f"worker rank {rank} failed its health check: {type(inner).__name__}: "
                    f"{_first_line(inner)}")  # fmt: skip
        return f"worker rank {rank}: {type(failure).__name__}: {_first_line(failure)}"
    cause = memory_cause(f"{type(error).__name__}: {error}")
    if cause:
        return f"{cause}: {_memory_detail(str(error))}"
    return f"{type(error).__name__}: {_first_line(error)}"


def error_reason(error: BaseException | None) -> str | None:
    """One line for a trial's error as Tune hands it over (a RayTaskError around the trial's
    own exception, or a RayActorError when the trial actor itself died)."""
    if error is None:
        return None
    cause = getattr(error, "cause", None) or error
    if isinstance(cause, TrialFailed):
        return str(cause)
    node = node_cause(str(cause))
    if node:
        return f"the trial's own actor died with its node: {node}"
    memory = memory_cause(f"{type(cause).__name__}: {cause}")
    if memory:
        return f"{memory}: the trial's own actor died ({_memory_detail(str(cause))})"
    return f"{type(cause).__name__}: {_first_line(cause)}"


def trial_error_reason(trial) -> str | None:
    """``error_reason`` of a Tune trial's error, read from the driver's own copy (Tune writes
    it there before ``on_trial_error``; the copy in storage follows later); the last line of
    the error text when the pickle cannot be read; None when there is neither."""
    import cloudpickle

    pickled = getattr(trial, "pickled_error_file", None)
    if pickled and Path(pickled).is_file():
        try:
            return error_reason(cloudpickle.loads(Path(pickled).read_bytes()))
        except Exception:  # an error class this process cannot load: use the text
            pass
    text_file = getattr(trial, "error_file", None)
    if text_file and Path(text_file).is_file():
        lines = [line.strip() for line in Path(text_file).read_text().splitlines()]
        lines = [line for line in lines if line]
        if lines:
            return lines[-1].removeprefix(f"{TrialFailed.__module__}.{TrialFailed.__name__}: ")
    return None


def distill_trial(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: one (pair set, seed) as one TorchTrainer run.

    config (from the ablation's param space): ``pair_set`` and ``seed`` (grid axes),
    ``pair_sets`` (name -> pair dicts), ``run`` (the DistillConfig template), ``scaling``,
    ``train_storage``. The Train run is named after the Tune trial id, which survives
    ``Tuner.restore``: a restored trial finds its Train run's checkpoints and resumes there.
    A failed Train run raises TrialFailed with one line saying why (``failure_line``),
    which is printed here and becomes the trial's error in Tune and MLflow.
    """
    import ray.train
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from trainers.run_config import load_distill_config

    trial_id = ray.tune.get_context().get_trial_id()
    run = {**config["run"], "pairs": config["pair_sets"][config["pair_set"]]}
    run["seed"] = config["seed"]
    cfg = load_distill_config(run, source=f"trial {config['pair_set']} seed {config['seed']}")
    scaling = ScalingSpec(**config["scaling"])
    trainer = make_torch_trainer(
        cfg,
        scaling,
        run_name=f"trial-{trial_id}",
        storage_path=config["train_storage"],
        callbacks=[TuneReportCallback()],
        progress=False,
    )
    try:
        with start_timeout_env(scaling):
            trainer.fit()
    except ray.train.TrainingFailedError as error:
        line = failure_line(error, scaling)
        print(f"conaclip: trial {config['pair_set']} seed {config['seed']} failed: {line}",
              file=sys.stderr, flush=True)  # fmt: skip
        raise TrialFailed(line) from None
