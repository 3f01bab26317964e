"""Where a trial's wall-clock goes before and after its training: a timeline per trial.

Runs a short ablation exactly as `conaclip ablate` runs it (a Tune trial launching a
TorchTrainer, MLflow logging in the driver) and splits each trial, from Tune starting it to
Tune seeing it complete, into:

    schedule   Tune starts the trial -> the Train worker process exists (trial actor, its
               imports, TorchTrainer, Train controller actor, placement group, worker actor)
    imports    worker process start -> the loop starts (torch, open_clip, the train function)
    setup      the loop's own set-up (models, teacher weights, eval set, data pipeline)
    work       training steps + evaluation + checkpoints (the loop's phase_s)
    plumbing   the loop's last report -> Tune sees that result
    shutdown   last result -> Tune marks the trial complete (worker group and controller end)

"Ray's share" is schedule + imports + plumbing + shutdown: everything but the loop's own work
and set-up. Timestamps: Tune's callbacks in the driver, the worker's process start (/proc) and
run start (reported by the loop); one machine, one clock.

    python benchmarks/trial_startup.py --trials 6 --concurrency 1 --out runs/bench/startup-c1.json
    python benchmarks/trial_startup.py --trials 6 --concurrency 2 --out runs/bench/startup-c2.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import trainers  # noqa: F401  (torchvision compat first)

SEGMENTS = ("schedule", "imports", "setup", "work", "plumbing", "shutdown")
RAY_SEGMENTS = ("schedule", "imports", "plumbing", "shutdown")


def timeline_callback():
    """A Tune callback that records, per trial id, when it started, each result's arrival
    (with the result) and when it completed, all in driver wall-clock seconds."""
    from ray.tune import Callback

    class Timeline(Callback):
        def __init__(self) -> None:
            self.trials: dict[str, dict[str, Any]] = {}

        def _row(self, trial) -> dict[str, Any]:
            return self.trials.setdefault(trial.trial_id, {"config": dict(trial.config)})

        def on_trial_start(self, iteration, trials, trial, **info) -> None:
            self._row(trial)["started"] = time.time()

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            row = self._row(trial)
            row["last_result_at"] = time.time()
            row["last_result"] = dict(result)

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            self._row(trial)["completed"] = time.time()

    return Timeline()


def split(row: dict[str, Any]) -> dict[str, float] | None:
    """One trial's segments in seconds (None for a trial that never reported)."""
    result = row.get("last_result")
    if not result or "completed" not in row or "process_started_unix" not in result:
        return None
    work = result["train_s"] + result["eval_s"] + result["checkpoint_s"]
    loop_reported = result["run_started_unix"] + result["setup_s"] + work
    segments = {
        "schedule": result["process_started_unix"] - row["started"],
        "imports": result["run_started_unix"] - result["process_started_unix"],
        "setup": result["setup_s"],
        "work": work,
        "plumbing": row["last_result_at"] - loop_reported,
        "shutdown": row["completed"] - row["last_result_at"],
    }
    segments["ray"] = sum(segments[key] for key in RAY_SEGMENTS)
    segments["total"] = row["completed"] - row["started"]
    return segments


def stamps(row: dict[str, Any]) -> dict[str, float]:
    """The raw timestamps of one trial (Unix seconds), for a timeline across trials."""
    result = row.get("last_result") or {}
    keys = ("process_started_unix", "run_started_unix")
    return {
        "started": row.get("started"),
        **{key: result.get(key) for key in keys},
        "last_result_at": row.get("last_result_at"),
        "completed": row.get("completed"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6, help="trials (demo pair sets, seeds)")
    parser.add_argument("--concurrency", type=int, default=1, help="trials at once")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--student", default="conaclip-student-xs")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--label", default="", help="what this run measures, kept in the JSON")
    parser.add_argument("--out", default="runs/bench/trial_startup.json")
    args = parser.parse_args()

    import ray

    from orchestrator import tracking
    from orchestrator.ablate_cli import add_ablation_flags, build_spec
    from orchestrator.ablation import resolve_spec, run_ablation
    from orchestrator.cli_flags import workspace_of
    from orchestrator.ray_cluster import start_local_cluster

    work = Path(tempfile.mkdtemp(prefix="conaclip-startup-"))
    cli = argparse.ArgumentParser()
    add_ablation_flags(cli)
    seeds = -(-args.trials // 5)
    flags = ["--preset", "demo", "--name", "startup", "--out", str(work / "ablate"),
             "--student", args.student, "--steps", str(args.steps),
             "--eval-every", str(args.steps), "--batch-size", str(args.batch_size),
             "--seeds", str(seeds), "--max-concurrent-trials", str(args.concurrency)]  # fmt: skip
    spec, use_cache = build_spec(cli.parse_args(flags))
    spec = spec.model_copy(update={"trials": spec.trial_list()[: args.trials]})
    start_local_cluster(num_cpus=2, log_to_driver=False)
    try:
        spec = resolve_spec(spec, workspace_of(argparse.Namespace(home=None)), use_cache)
        tracking.get_or_create_experiment(spec.tracking_uri, spec.experiment_name)
        timeline = timeline_callback()
        started = time.time()
        outcome = run_ablation(spec, callbacks=(timeline,))
        wall = time.time() - started
    finally:
        ray.shutdown()
    rows = [split(row) for row in timeline.trials.values()]
    rows = [row for row in rows if row is not None]
    timestamps = [stamps(row) for row in timeline.trials.values()]
    medians = {key: statistics.median(row[key] for row in rows) for key in rows[0]}
    result = {
        "args": vars(args),
        "ray": ray.__version__,
        "failed": [t.pair_set for t in outcome.failed],
        "trials_wall_s": wall,
        "median_s": medians,
        "trials": rows,
        "timestamps": timestamps,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{len(rows)} trials, {args.concurrency} at a time, {wall:.1f} s wall-clock")
    print("segment   " + "  ".join(f"{key:>8}" for key in medians))
    print("median s  " + "  ".join(f"{value:8.2f}" for value in medians.values()))
    print(f"wrote {args.out}; run outputs in {work}")


if __name__ == "__main__":
    main()
