"""The demo as a measured figure: ``make demo`` from an empty home, timed, its verdict table and
race recorded in ``docs/results/demo.json`` and its runs as a grid record in
``docs/results/demo_grid/`` (``conaclip table --from docs/results/demo_grid`` re-derives the
table on any machine).

    python benchmarks/demo_run.py --home /tmp/empty-home --out docs/results/demo.json
    # or record a demo that already ran (its printed output saved to a file):
    python benchmarks/demo_run.py --existing runs/demo --log demo.log --out docs/results/demo.json

``--home`` must not exist (the demo then generates the data and trains the teacher, as on a new
machine); the demo's own "demo finished in N s" line is the figure, make's wall time beside it.
Running it twice with the same home shows the warm demo, which goes on with the same race.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from noise_budget import _provenance

FINISHED = re.compile(r"^demo finished in (\d+) s$", re.M)


def _record(out_dir: Path, log: str, wall: float | None, args: argparse.Namespace) -> None:
    import trainers  # noqa: F401  (torchvision compat first)
    from orchestrator import reports, tracking

    uri = tracking.default_tracking_uri(out_dir)
    runs = tracking.runs_frame(uri, "demo")
    source = reports.ReportSource(out_dir, "demo", uri)
    table = reports.read_selection(source, reports.TableOptions()).table
    race = json.loads((reports.report_dir(out_dir, "demo") / "race.json").read_text())
    found = FINISHED.findall(log)
    columns = ["pair_set", "added", "used_weight", "used_temperature", "seeds", "rsum_mean",
               "rsum_ci_low", "rsum_ci_high", "gain_mean", "gain_ci_low", "gain_ci_high",
               "gain_low", "gain_high", "eval_share", "p_diff_adj", "p_equiv_adj", "verdict",
               "verdict_note"]  # fmt: skip
    rows = json.loads(table[columns].to_json(orient="records"))
    record = Path(args.grid)
    reports.record_grid(source, record)
    opened = [line for line in log.splitlines() if line.startswith("open: ")]
    result = {
        **_provenance(sys.argv[1:]),
        "demo_command": "make demo (CONACLIP_HOME an empty folder)",
        "demo_reported_s": [int(s) for s in found],
        "wall_s": None if wall is None else round(wall, 1),
        "trials": len(runs),
        "margin": table.attrs["margin"],
        "design": table.attrs["design"],
        "table": rows,
        "race": {k: race[k] for k in ("rounds", "verdict", "trials", "stopped")},
        "open_lines": opened,
        "grid_record": str(record),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("demo_reported_s", "wall_s", "trials")}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, help="an empty CONACLIP_HOME for a cold demo")
    parser.add_argument("--existing", type=Path, help="record a demo that already ran here")
    parser.add_argument("--log", type=Path, help="with --existing: the demo's printed output")
    parser.add_argument("--grid", default="docs/results/demo_grid")
    parser.add_argument("--out", default="docs/results/demo.json")
    args = parser.parse_args()
    if args.existing is not None:
        _record(args.existing, args.log.read_text() if args.log else "", None, args)
        return
    if args.home is None or args.home.exists():
        raise SystemExit("demo_run: --home must name a folder that does not exist yet")
    started = time.time()
    env = {**os.environ, "CONACLIP_HOME": str(args.home)}
    done = subprocess.run(["make", "demo"], env=env, capture_output=True, text=True)
    wall = time.time() - started
    sys.stderr.write(done.stderr[-3000:])
    if done.returncode != 0:
        raise SystemExit(f"demo_run: make demo exited {done.returncode}")
    _record(Path("runs/demo"), done.stdout, wall, args)


if __name__ == "__main__":
    main()
