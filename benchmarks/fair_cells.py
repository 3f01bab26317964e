"""Fair cells: how a single-addition cell's result depends on its weight, temperature and the
Sym partner's orientation, measured with the training loop itself (no Ray: the numbers are the
loop's, and a trial under Ray Train runs the same loop).

Each run is the built-in data, teacher and teacher cache with the demo's student settings
(student-xs, 150 steps x 32, one eval at the end). Runs go two at a time, one thread each.
Every variant is a pair set in the string form ``conaclip ablate --pairs`` reads, plus
settings; results (rsum, recalls, the weight and temperature each pair used) go to a JSON file
that grows as runs finish, so an interrupted benchmark keeps what it measured and a rerun
skips finished rows.

    python benchmarks/fair_cells.py \
        --sets "intra_ts:infonce;intra_ts:infonce,inter_ts:sym_kl*auto" \
        --seeds 0,1,2 --set kd_temperature=0.5 --out runs/bench/fair_cells.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import trainers  # noqa: F401  (torchvision compat first)

KEYS = ("t2i_R1", "t2i_R5", "t2i_R10", "i2t_R1", "i2t_R5", "i2t_R10", "rsum")
DEMO = {"student": "conaclip-student-xs", "steps": 150, "batch_size": 32}


def _run(config: dict[str, Any]) -> dict[str, Any]:
    from trainers.distill import train_loop_per_worker

    reports: list[dict[str, Any]] = []
    started = time.time()
    with tempfile.TemporaryDirectory() as out:
        train_loop_per_worker({**config, "out_dir": out}, lambda m, d: reports.append(m))
    return {**reports[-1], "wall_s": time.time() - started}


def _value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _key(row: dict[str, Any]) -> str:
    return json.dumps([row["pairs"], row["seed"], row["settings"]], sort_keys=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", required=True, help="pair sets, ';' between sets")
    parser.add_argument("--seeds", default="0")
    parser.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE",
        help="a DistillConfig setting for every run (repeatable)",
    )  # fmt: skip
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--out", default="runs/bench/fair_cells.json")
    args = parser.parse_args()

    from orchestrator.assets import resolve_run
    from orchestrator.config import Workspace
    from orchestrator.ray_cluster import start_local_cluster
    from trainers.run_config import DistillConfig

    settings = {**DEMO, **{k: _value(v) for k, v in (s.split("=", 1) for s in args.set)}}
    template = DistillConfig(pairs="intra_ts:infonce", **settings)
    start_local_cluster(num_cpus=2, log_to_driver=False)  # the teacher cache builds on Ray
    template = resolve_run(template, Workspace(), use_teacher_cache=True)
    out = Path(args.out)
    rows: list[dict[str, Any]] = json.loads(out.read_text()) if out.is_file() else []
    done = {_key(r) for r in rows}
    jobs = []
    for pairs in (p.strip() for p in args.sets.split(";") if p.strip()):
        for seed in (int(s) for s in args.seeds.split(",")):
            row = {"pairs": pairs, "seed": seed, "settings": settings}
            if _key(row) in done:
                continue
            cfg = template.model_copy(update={"seed": seed, "torch_threads": 1})
            cfg = DistillConfig.model_validate({**cfg.model_dump(), "pairs": pairs,
                                                "eval_every": settings["steps"]})  # fmt: skip
            jobs.append((row, cfg.model_dump(mode="json")))
    print(f"{len(jobs)} runs ({len(done)} already in {out})", flush=True)
    # spawn: the parent holds a Ray connection, which a forked child must not inherit.
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.parallel, mp_context=spawn) as pool:
        futures = {pool.submit(_run, config): row for row, config in jobs}
        for future in as_completed(futures):
            row = futures[future]
            metrics = future.result()
            used = {k: v for k, v in metrics.items() if k.startswith(("weight_", "temperature_"))}
            rows.append({**row, **{k: metrics[k] for k in KEYS}, "used": used,
                         "wall_s": metrics["wall_s"]})  # fmt: skip
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(rows, indent=1))
            print(f"{row['pairs']:<45} seed {row['seed']}  rsum {metrics['rsum']:7.2f}  "
                  f"{used}", flush=True)  # fmt: skip
    import ray

    ray.shutdown()


if __name__ == "__main__":
    main()
