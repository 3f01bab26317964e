"""Ray's floor under a trial: what a Tune trial launching a TorchTrainer costs with no training.

Each trial here is conaclip's trial minus the distillation: the same reused Tune trial actor
(fifo), the same ``LeanTorchTrainer`` from ``orchestrator.trial.make_torch_trainer`` (health
checks every 0.25 s, one worker of one CPU, ``TuneReportCallback``) on a local cluster started
like conaclip's, but the worker's loop only reports once. Whatever such a trial takes is Ray's
share that no change to conaclip's own code can remove, on this machine. Modes:

    tune+train   Tune trial -> TorchTrainer.fit -> controller, worker group, one report
    train        TorchTrainer.fit called in this process, one after the other (no Tune)
    tune         a Tune trial that only reports (no Train)

``--import-stack`` makes the worker's loop import conaclip's training stack (torch, open_clip,
``trainers.distill``) before it reports, as a real trial's worker does, and records how long
that took. Per trial: ``to_loop`` (trial start -> the worker's loop starts), ``after_loop``
(the loop's report -> the trial is complete), ``total``; medians over trials, seconds.

    python benchmarks/train_floor.py --mode tune+train --trials 6 --concurrency 1
    python benchmarks/train_floor.py --mode tune+train --trials 6 --concurrency 2
    python benchmarks/train_floor.py --mode train --trials 4
    python benchmarks/train_floor.py --mode tune --trials 6
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.run_timing import segments

MODES = ("tune+train", "train", "tune")


def make_loop(import_stack: bool, stamp_file: str | None = None) -> Callable[[dict], None]:
    """The worker's loop: report when it started (and the stack's import time) once, and
    write the same to ``stamp_file`` if given (a fit outside Tune returns no metrics without a
    checkpoint).

    Built as a closure so cloudpickle ships it by value: the worker imports nothing of this
    script, and with ``import_stack`` False nothing of conaclip either.
    """

    def loop(config: dict[str, Any]) -> None:
        import json
        import time as clock

        started = clock.time()
        import ray.train

        stack_s = 0.0
        if import_stack:
            import trainers.distill  # noqa: F401  (torch, open_clip, the loop's modules)

            stack_s = clock.time() - started
        stamps = {"loop_started_unix": started, "stack_import_s": stack_s,
                  "reported_unix": clock.time()}  # fmt: skip
        if stamp_file is not None:
            with open(stamp_file, "w") as handle:
                json.dump(stamps, handle)
        ray.train.report(stamps)

    return loop


def fit_empty_trainer(loop, storage: str, run_name: str, callbacks: list) -> Any:
    """One ``TorchTrainer.fit`` exactly as a conaclip trial builds it, running ``loop``."""
    from orchestrator.trial import ScalingSpec, make_torch_trainer, start_timeout_env
    from trainers.run_config import DistillConfig

    scaling = ScalingSpec()
    trainer = make_torch_trainer(DistillConfig(), scaling, run_name, storage, callbacks=callbacks,
                                 progress=False, train_loop=loop)  # fmt: skip
    with start_timeout_env(scaling):
        return trainer.fit()


def tune_trial(config: dict[str, Any]) -> None:
    """A Tune function trainable: one empty TorchTrainer run, or (mode tune) one report."""
    import ray.tune

    if config["mode"] == "tune":
        now = time.time()
        ray.tune.report({"loop_started_unix": now, "stack_import_s": 0.0, "reported_unix": now})
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = ray.tune.get_context().get_trial_id()
    fit_empty_trainer(make_loop(config["import_stack"]), config["storage"], f"trial-{trial_id}",
                      [TuneReportCallback()])  # fmt: skip


def run_tune(args: argparse.Namespace, storage: Path) -> list[dict[str, float]]:
    from ray import tune
    from trial_startup import timeline_callback

    from orchestrator.ablation import TRIAL_DRIVER_MEMORY

    timeline = timeline_callback()
    trainable = tune.with_resources(tune_trial, {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY})
    space = {"mode": args.mode, "import_stack": args.import_stack, "storage": str(storage),
             "index": tune.grid_search(list(range(args.trials)))}  # fmt: skip
    tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(max_concurrent_trials=args.concurrency, reuse_actors=True),
        run_config=tune.RunConfig(
            storage_path=str(storage / "tune"), callbacks=[timeline], verbose=0
        ),
    ).fit()
    rows = []
    for row in timeline.trials.values():
        if "completed" in row and "last_result" in row:
            rows.append(segments(row["started"], row["completed"], row["last_result"]))
    return rows


def run_train(args: argparse.Namespace, storage: Path) -> list[dict[str, float]]:
    rows = []
    for index in range(args.trials):
        stamp_file = storage / f"fit-{index}.json"
        started = time.time()
        loop = make_loop(args.import_stack, str(stamp_file))
        fit_empty_trainer(loop, str(storage), f"fit-{index}", [])
        rows.append(segments(started, time.time(), json.loads(stamp_file.read_text())))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=MODES, default="tune+train")
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--concurrency", type=int, default=1, help="trials at once (Tune modes)")
    parser.add_argument(
        "--import-stack",
        action="store_true",
        help="the worker imports torch, open_clip and trainers.distill first",
    )
    parser.add_argument("--out", default="runs/bench/train_floor.json")
    args = parser.parse_args()

    import ray

    import trainers  # noqa: F401  (torchvision compat before anything imports open_clip)
    from orchestrator.ray_cluster import start_local_cluster

    storage = Path(tempfile.mkdtemp(prefix="conaclip-floor-"))
    start_local_cluster(num_cpus=2, log_to_driver=False)
    try:
        started = time.time()
        rows = run_train(args, storage) if args.mode == "train" else run_tune(args, storage)
        wall = time.time() - started
    finally:
        ray.shutdown()
    medians = {key: statistics.median(row[key] for row in rows) for key in rows[0]}
    result = {"args": vars(args), "ray": ray.__version__, "wall_s": wall, "median_s": medians,
              "trials": rows}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{args.mode}: {len(rows)} trials, {args.concurrency} at a time, {wall:.1f} s")
    print("segment   " + "  ".join(f"{key:>12}" for key in medians))
    print("median s  " + "  ".join(f"{value:12.2f}" for value in medians.values()))
    print(f"wrote {args.out}; run outputs in {storage}")


if __name__ == "__main__":
    main()
