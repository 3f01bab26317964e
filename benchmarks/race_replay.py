"""Seed racing replayed offline on a recorded full grid (``orchestrator.race_replay``): the
race's verdict and trial-steps against the full grid's.

    conaclip ablate --preset single_additions --seeds 5 --out runs/bench/race --name grid5
    python benchmarks/race_replay.py --tracking-uri sqlite:///$PWD/runs/bench/race/mlruns.db \\
        --experiment grid5 --start-seeds 2 --max-seeds 5 --out runs/bench/race/replay.json

Output: the JSON report (``--out``) and one Markdown table row on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import trainers  # noqa: F401  (torchvision compat before anything imports open_clip)
from orchestrator import race, race_replay, tracking
from orchestrator.sequential import DEFAULT_SPENDING, SPENDING
from orchestrator.verdicts import DEFAULT_MARGIN
from trainers.errors import InputError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", required=True, help="MLflow URI holding the full grid")
    parser.add_argument("--experiment", required=True, help="the grid's MLflow experiment")
    parser.add_argument("--start-seeds", type=int, default=2, help="K0, as --seeds under --race")
    parser.add_argument("--max-seeds", type=int, default=5, help="M, as --max-seeds")
    parser.add_argument("--metric", default="rsum")
    parser.add_argument("--margin", type=float, default=DEFAULT_MARGIN)
    parser.add_argument("--spending", choices=SPENDING, default=DEFAULT_SPENDING)
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    args = parser.parse_args(argv)
    try:
        tracking.check_tracking_uri(args.tracking_uri, must_exist=True)
        runs = tracking.runs_frame(args.tracking_uri, args.experiment)
        runs = race_replay.without_verification(runs)
        report = race_replay.replay(
            runs, args.start_seeds, args.max_seeds, args.metric,
            race.RanksCache(args.tracking_uri), margin=args.margin, spending=args.spending,
        )  # fmt: skip
    except InputError as error:
        print(f"race_replay: error: {error}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    print(race_replay.MARKDOWN_HEADER)
    print(race_replay.markdown_row(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
