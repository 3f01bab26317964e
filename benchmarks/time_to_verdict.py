"""Time to a verdict: ``single_additions`` raced on this machine from a built teacher cache,
decided cells and wall time, written to ``docs/results/time_to_verdict.json``.

    python benchmarks/time_to_verdict.py --max-seeds 5 --out docs/results/time_to_verdict.json

Runs the product's own command (``conaclip ablate --preset single_additions --race`` with the
demo's student and budget) as a subprocess, times it end to end, and reads the race's
``race.json`` (rounds, trials, verdict). The built-in data, teacher and teacher cache must
exist (run ``make demo`` once, with the same ``CONACLIP_HOME``): the figure is the ablation's,
not the teacher's. ``--reference`` gives the figure the race is held against (decided cells
and minutes of an earlier fixed grid), recorded beside the measurement with its source.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from noise_budget import _provenance

DEMO_FLAGS = ["--student", "conaclip-student-xs", "--steps", "150", "--batch-size", "32",
              "--eval-every", "150"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start-seeds", type=int, default=2)
    parser.add_argument("--max-seeds", type=int, default=5)
    parser.add_argument("--spending", default="obf")
    parser.add_argument("--runs", default="runs/bench/time_to_verdict")
    parser.add_argument("--name", default=None)
    parser.add_argument("--reference-decided", type=int, default=7)
    parser.add_argument("--reference-minutes", type=float, default=31.5)
    parser.add_argument(
        "--reference-source",
        default="a fixed 5-seed single_additions grid under the previous verdict rule (seed "
        "t-test and eval-query bootstrap each below alpha), the same trial, this machine type",
    )
    parser.add_argument("--out", default="docs/results/time_to_verdict.json")
    args = parser.parse_args()
    name = args.name or f"ttv-{args.start_seeds}-{args.max_seeds}-{args.spending}"
    command = [sys.executable, "-m", "orchestrator.cli", "ablate", "--preset",
               "single_additions", "--race", "--seeds", str(args.start_seeds), "--max-seeds",
               str(args.max_seeds), "--spending", args.spending, *DEMO_FLAGS, "--out",
               args.runs, "--name", name]  # fmt: skip
    started = time.time()
    done = subprocess.run(command, text=True)
    wall = time.time() - started
    if done.returncode != 0:
        raise SystemExit(f"time_to_verdict: the race exited {done.returncode}")
    race = json.loads((Path(args.runs) / "reports" / name / "race.json").read_text())
    verdict = race["verdict"]
    decided = sum(len(verdict[k]) for k in ("better", "worse", "equivalent"))
    result = {
        **_provenance(sys.argv[1:]),
        "race_command": " ".join(["conaclip", *command[3:]]),
        "wall_s": round(wall, 1),
        "cells": len(race["cells"]),
        "decided": decided,
        "decided_per_hour": round(decided / (wall / 3600), 2),
        "verdict": verdict,
        "rounds": len(race["rounds"]),
        "trials": race["trials"],
        "spent_steps": race["spent_steps"],
        "full_steps": race["full_steps"],
        "reference": {
            "decided": args.reference_decided,
            "minutes": args.reference_minutes,
            "decided_per_hour": round(args.reference_decided / (args.reference_minutes / 60), 2),
            "source": args.reference_source,
        },
    }
    result["speedup_decided_per_hour"] = round(
        result["decided_per_hour"] / result["reference"]["decided_per_hour"], 2
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("wall_s", "decided", "decided_per_hour",
                                               "speedup_decided_per_hour")}))  # fmt: skip


if __name__ == "__main__":
    main()
