"""Samples/s of one distillation trial: bare loop vs TorchTrainer (1 and 2 workers), and the
teacher-embedding cache vs a live teacher forward.

Goals: Ray costs at most 10% over the bare loop; the cache gives at least 3x over the
live teacher. Uses the built-in data and teacher (generated on first use under $CONACLIP_HOME).
samples/s is the loop's own figure for the last of three report windows, so start-up (worker
processes, the data pipeline's first batch) is left out of every setting alike.

    python benchmarks/trial_throughput.py --steps 90 --out runs/bench/trial_throughput.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import trainers  # noqa: F401  (torchvision compat first)
from orchestrator.assets import ensure_builtin_data, ensure_builtin_teacher, ensure_teacher_cache
from orchestrator.config import Workspace
from orchestrator.ray_cluster import start_local_cluster
from orchestrator.trial import ScalingSpec, fit_or_raise, make_torch_trainer
from trainers.distill import train_loop_per_worker
from trainers.run_config import DistillConfig


def bare(cfg: DistillConfig) -> float:
    reports: list[dict] = []
    with tempfile.TemporaryDirectory() as out:
        run = cfg.model_copy(update={"out_dir": out})
        train_loop_per_worker(run.model_dump(mode="json"), lambda m, d: reports.append(m))
    return reports[-1]["samples_per_s"]


def with_ray(cfg: DistillConfig, workers: int) -> float:
    with tempfile.TemporaryDirectory() as storage:
        threads = max(1, cfg.torch_threads // workers)
        run = cfg.model_copy(update={"torch_threads": threads})
        scaling = ScalingSpec(num_workers=workers)
        trainer = make_torch_trainer(run, scaling, f"bench-{workers}", storage, progress=False)
        result = fit_or_raise(trainer, scaling)
    return result.metrics["samples_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=90, help="three report windows of steps/3")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--students", default="conaclip-student-s,conaclip-student-xs")
    parser.add_argument("--pairs", default="intra_ts:infonce,inter_ss:kl")
    parser.add_argument("--out", default="runs/bench/trial_throughput.json")
    args = parser.parse_args()

    import ray

    workspace = Workspace()
    shards = ensure_builtin_data(workspace)
    teacher, checkpoint, _ = ensure_builtin_teacher(workspace, shards)
    # The eval set is left out on purpose: samples/s covers training steps only anyway.
    start_local_cluster(num_cpus=2, log_to_driver=False)
    rows, summary = [], {}
    for student in args.students.split(","):
        base = DistillConfig(
            pairs=args.pairs, student=student, teacher=teacher, teacher_checkpoint=checkpoint,
            train_shards=shards.train, eval_shards="", steps=args.steps,
            eval_every=max(1, args.steps // 3), batch_size=args.batch_size, torch_threads=2,
            loader_workers=1,
        )  # fmt: skip
        cache = ensure_teacher_cache(base, workspace)
        cached = base.model_copy(update={"teacher_cache": str(cache)})
        by = {}
        settings = (("bare loop, live teacher", base, 0),
                    ("bare loop, teacher cache", cached, 0),
                    ("TorchTrainer 1 worker, cache", cached, 1),
                    ("TorchTrainer 2 workers, cache", cached, 2))  # fmt: skip
        for label, cfg, workers in settings:
            started = time.time()
            by[label] = with_ray(cfg, workers) if workers else bare(cfg)
            rows.append({"student": student, "setting": label, "samples_per_s": by[label],
                         "wall_s": time.time() - started})  # fmt: skip
            print(rows[-1], flush=True)
        summary[student] = {
            "cache_speedup": by["bare loop, teacher cache"] / by["bare loop, live teacher"],
            "ray_1_worker_overhead": 1
            - by["TorchTrainer 1 worker, cache"] / by["bare loop, teacher cache"],
        }
    ray.shutdown()
    print("\n| student | setting | samples/s | wall s |\n|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['student']} | {r['setting']} | {r['samples_per_s']:.1f} | {r['wall_s']:.0f} |")
    for student, numbers in summary.items():
        print(f"{student}: cache speed-up {numbers['cache_speedup']:.2f}x; "
              f"Ray 1-worker overhead {100 * numbers['ray_1_worker_overhead']:.1f}%")  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"args": vars(args), "rows": rows, "summary": summary}, indent=2)
    )


if __name__ == "__main__":
    main()
