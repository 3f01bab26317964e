"""Headroom on the built-in data: the teacher's recall against students trained at one step
budget without distillation (inter_ss:infonce, the student's own CLIP loss) and with the MoTIS
baseline (intra_ts:infonce). Distillation is only measurable when the students land clearly
below the teacher.

    python benchmarks/headroom.py --steps 300 --out runs/bench/headroom.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import trainers  # noqa: F401  (torchvision compat first)
from orchestrator.assets import ensure_builtin_data, ensure_builtin_teacher, resolve_run
from orchestrator.config import Workspace
from orchestrator.ray_cluster import start_local_cluster
from trainers.distill import train_loop_per_worker
from trainers.run_config import DistillConfig

KEYS = ("t2i_R1", "t2i_R5", "t2i_R10", "i2t_R1", "i2t_R5", "i2t_R10", "rsum")


def train(cfg: DistillConfig) -> dict:
    reports: list[dict] = []
    with tempfile.TemporaryDirectory() as out:
        run = cfg.model_copy(update={"out_dir": out})
        train_loop_per_worker(run.model_dump(mode="json"), lambda m, d: reports.append(m))
    return reports[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--students", default="conaclip-student-s,conaclip-student-xs")
    parser.add_argument("--out", default="runs/bench/headroom.json")
    args = parser.parse_args()

    import ray

    workspace = Workspace()
    shards = ensure_builtin_data(workspace)
    teacher, _, teacher_metrics = ensure_builtin_teacher(workspace, shards)
    start_local_cluster(num_cpus=2, log_to_driver=False)
    rows = [{"model": teacher, "training": "teacher (CLIP loss)", **teacher_metrics}]
    for student in args.students.split(","):
        for label, pairs in (("no distillation: inter_ss:infonce", "inter_ss:infonce"),
                             ("MoTIS: intra_ts:infonce", "intra_ts:infonce")):  # fmt: skip
            # The product's own path fills in data, teacher, teacher cache and eval cache.
            cfg = resolve_run(
                DistillConfig(pairs=pairs, student=student, steps=args.steps,
                              eval_every=args.steps, batch_size=args.batch_size,
                              torch_threads=2),
                workspace,
                use_teacher_cache=True,
            )  # fmt: skip
            started = time.time()
            metrics = train(cfg)
            rows.append({"model": student, "training": label, **metrics,
                         "wall_s": time.time() - started})  # fmt: skip
            print({k: rows[-1].get(k) for k in ("model", "training", "rsum")}, flush=True)
    ray.shutdown()
    print("\n| model | training | " + " | ".join(KEYS) + " |")
    print("|---|---|" + "---:|" * len(KEYS))
    for row in rows:
        cells = " | ".join(f"{row[k]:.2f}" for k in KEYS)
        print(f"| {row['model']} | {row['training']} | {cells} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
