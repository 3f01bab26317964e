"""A/A calibration on the built-in data: how often the verdict rule calls a difference where
there is none. Every "cell" is the baseline itself under its own, independent seed stream, so
each cell's true gain is 0: "better" or "worse" is a false decision, "equivalent" a right one,
"open" no decision.

    python benchmarks/aa_calibration.py pool --runs 100
    python benchmarks/aa_calibration.py analyze --grids 25 --out docs/results/aa_calibration.json

``pool`` trains the demo's baseline trial (the demo preset's settings) with seeds 10000,
10001, ... with the training loop itself (no Ray), two at a time, and keeps each run's rsum
and per-query eval ranks under ``runs/bench/aa/``. ``analyze`` draws A/A grids from the pool:
a grid is a baseline and ``--cells`` null cells at ``--max-seeds`` seed slots, every slot a
different pool run (drawn without replacement within the grid), and decides it with the
product's own functions twice: as a fixed grid (``orchestrator.table.selection_table``) and as
the race would (``orchestrator.race_replay.replay``: the same design, looks and stopping). Grids
share pool runs with each other, so their decisions are not independent: the rate is
unbiased, and its interval below counts grids, not decisions, to stay honest about that.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from noise_budget import _provenance, _train_one

ROOT = Path("runs/bench/aa")
BASELINE_PAIRS = "intra_ts:infonce"
FIRST_SEED = 10_000


def pool(args: argparse.Namespace) -> None:
    from orchestrator.assets import resolve_run
    from orchestrator.config import Workspace
    from orchestrator.ray_cluster import start_local_cluster
    from search_spaces.presets import load_preset
    from trainers.run_config import DistillConfig

    settings = dict(load_preset("demo").settings)
    ROOT.mkdir(parents=True, exist_ok=True)
    template = DistillConfig(pairs=BASELINE_PAIRS, **settings)
    start_local_cluster(num_cpus=2, log_to_driver=False)  # a missing teacher cache builds on Ray
    template = resolve_run(template, Workspace(), use_teacher_cache=True)
    import ray

    ray.shutdown()
    rows_file = ROOT / "pool.json"
    rows = json.loads(rows_file.read_text()) if rows_file.is_file() else {}
    if rows and json.loads((ROOT / "settings.json").read_text()) != settings:
        raise SystemExit(f"{ROOT}: the pool was trained with other settings")
    (ROOT / "settings.json").write_text(json.dumps(settings, indent=1))
    jobs = []
    for seed in range(FIRST_SEED, FIRST_SEED + args.runs):
        if str(seed) in rows:
            continue
        config = template.model_copy(update={"seed": seed}).model_dump()
        jobs.append((seed, config))
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.parallel, mp_context=context) as executor:
        futures = {}
        for seed, config in jobs:
            target, ranks = str(ROOT / f"s{seed}.pt"), str(ROOT / f"s{seed}.npz")
            futures[executor.submit(_train_one, config, target, ranks)] = seed
        for done, future in enumerate(as_completed(futures), 1):
            seed = futures[future]
            rows[str(seed)] = future.result()
            (ROOT / f"s{seed}.pt").unlink()  # only the ranks are needed
            rows_file.write_text(json.dumps(rows, indent=1, sort_keys=True))
            print(
                f"[{done}/{len(jobs)}] seed {seed}: rsum {rows[str(seed)]['rsum_1k']}", flush=True
            )


def grid_frame(runs: list[int], cells: int, seeds: int) -> tuple[pd.DataFrame, dict[str, Any]]:
    """A runs_frame-shaped A/A grid from pool seeds ``runs`` ((cells + 1) x seeds of them):
    slot (c, s) is run ``runs[c * seeds + s]``, cell 0 the baseline; and its eval ranks."""
    from orchestrator import stats

    rows, ranks = [], {}
    for c in range(cells + 1):
        name = "baseline" if c == 0 else f"null{c:02d}"
        for s in range(seeds):
            pool_seed = runs[c * seeds + s]
            run_id = f"{name}-{s}"
            arrays = dict(np.load(ROOT / f"s{pool_seed}.npz"))

            rows.append({
                "run_id": run_id, "status": "FINISHED", "params.pairs": BASELINE_PAIRS,
                "params.pair_set": name, "params.seed": str(s), "params.steps": "150",
                "tags.conaclip.status": "FINISHED",
                "tags.conaclip.baseline": str(c == 0).lower(),
                "metrics.rsum": stats.recalls_from_ranks(arrays)["rsum"],
            })  # fmt: skip
            ranks[run_id] = arrays
    return pd.DataFrame(rows), ranks


def _wilson(k: int, n: int) -> list[float]:
    if n == 0:
        return [math.nan, math.nan]
    z, p = 1.959964, k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def analyze(args: argparse.Namespace) -> None:
    from orchestrator import race_replay
    from orchestrator.table import selection_table
    from orchestrator.verdicts import DEFAULT_MARGIN

    available = sorted(int(p.stem[1:]) for p in ROOT.glob("s*.npz"))
    need = (args.cells + 1) * args.max_seeds
    if len(available) < need:
        raise SystemExit(f"{len(available)} pool runs, a grid needs {need}")
    rng = np.random.default_rng(args.seed)
    tallies: dict[str, dict[str, Any]] = {
        mode: {"better": 0, "worse": 0, "equivalent": 0, "open": 0, "grids_with_false": 0,
               "trials": 0} for mode in ("fixed", "race")
    }  # fmt: skip
    for g in range(args.grids):
        runs = [int(x) for x in rng.choice(available, size=need, replace=False)]
        frame, ranks = grid_frame(runs, args.cells, args.max_seeds)
        table = selection_table(frame, ranks=ranks, margin=args.margin)
        fixed = list(table.loc[~table["is_baseline"], "verdict"])
        report = race_replay.replay(
            frame, args.start_seeds, args.max_seeds,
            ranks=lambda visible, ranks=ranks: {r: ranks[r] for r in visible["run_id"]},
            say=lambda _: None, margin=args.margin,
        )  # fmt: skip
        verdict = report["verdict"]
        raced = [v for v in ("better", "worse", "equivalent", "open") for _ in verdict[v]]
        for mode, verdicts, trials in (("fixed", fixed, need), ("race", raced, report["trials"])):
            tally = tallies[mode]
            for v in verdicts:
                tally[v] += 1
            tally["grids_with_false"] += any(v in ("better", "worse") for v in verdicts)
            tally["trials"] += trials
        print(f"grid {g + 1}/{args.grids}: fixed {fixed.count('equivalent')} equivalent, "
              f"race {len(verdict['equivalent'])} equivalent in {report['trials']} trials",
              flush=True)  # fmt: skip
    for tally in tallies.values():
        decisions = args.grids * args.cells
        false = tally["better"] + tally["worse"]
        tally["replicates"] = decisions
        tally["false_decision_rate"] = false / decisions
        tally["equivalent_rate"] = tally["equivalent"] / decisions
        tally["family_wise_error"] = tally["grids_with_false"] / args.grids
        tally["family_wise_error_95ci_over_grids"] = _wilson(tally["grids_with_false"], args.grids)
        tally["trials_per_grid"] = tally.pop("trials") / args.grids
    pool_rows = json.loads((ROOT / "pool.json").read_text())
    result = {
        **_provenance(args.argv),
        "what": "A/A: null cells that are the demo's baseline trial under independent seeds, "
        "decided by the product's table (fixed grid) and race (replayed); a better/worse "
        "verdict is false, equivalent is right",
        "settings": json.loads((ROOT / "settings.json").read_text()),
        "pool_runs": len(available),
        "pool_rsum_mean": float(np.mean([r["rsum_1k"] for r in pool_rows.values()])),
        "pool_rsum_sd": float(np.std([r["rsum_1k"] for r in pool_rows.values()], ddof=1)),
        "grids": args.grids,
        "cells_per_grid": args.cells,
        "seeds": [args.start_seeds, args.max_seeds],
        "margin": args.margin if args.margin is not None else DEFAULT_MARGIN,
        "replicates": 2 * args.grids * args.cells,
        "false_decision_rate": (
            sum(t["better"] + t["worse"] for t in tallies.values()) / (2 * args.grids * args.cells)
        ),
        "fixed": tallies["fixed"],
        "race": tallies["race"],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k in ("fixed", "race")}, indent=1))


def main() -> None:
    import sys

    from orchestrator.verdicts import DEFAULT_MARGIN

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    p = sub.add_parser("pool")
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--parallel", type=int, default=2)
    p.set_defaults(handler=pool)
    a = sub.add_parser("analyze")
    a.add_argument("--grids", type=int, default=25)
    a.add_argument("--cells", type=int, default=9)
    a.add_argument("--start-seeds", type=int, default=2)
    a.add_argument("--max-seeds", type=int, default=5)
    a.add_argument("--margin", type=float, default=DEFAULT_MARGIN)
    a.add_argument("--seed", type=int, default=0, help="draw of the grids from the pool")
    a.add_argument("--out", default="docs/results/aa_calibration.json")
    a.set_defaults(handler=analyze)
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    args.handler(args)


if __name__ == "__main__":
    main()
