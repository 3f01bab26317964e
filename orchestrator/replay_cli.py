"""`conaclip replay`: a seed race replayed on a finished grid (an MLflow store or a grid
record), with no training: which cells it would decide and when, and the trial-steps it would
spend against the whole grid's (``orchestrator.race_replay``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from orchestrator import race, race_replay
from orchestrator.cli_flags import add_ablation_source_flags
from orchestrator.reports import ReportSource, source_runs
from orchestrator.sequential import DEFAULT_SPENDING, SPENDING
from orchestrator.verdicts import DEFAULT_MARGIN


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``replay``; its handler returns the exit code, bad input raises InputError."""
    parser = subparsers.add_parser(
        "replay",
        help="replay a seed race on a finished grid, without training",
        description="Replay `conaclip ablate --race` on a grid that already ran (every cell "
        "at --max-seeds seeds or more, e.g. `ablate --seeds 5`): the race reads the grid's "
        "runs instead of launching trials, with the same looks, error spending, margin and "
        "stopping rules, then its verdict is compared with the whole grid's. Prints the "
        "JSON report and one Markdown row (trial-steps spent, verdict counts, whether both "
        "agree). An earlier race's own runs replay too (the race alone is then reported).",
    )
    add_ablation_source_flags(parser)
    parser.add_argument(
        "--start-seeds",
        type=int,
        default=2,
        metavar="K",
        help="seeds every cell starts with, as --seeds under --race (default 2)",
    )
    parser.add_argument(
        "--max-seeds",
        type=int,
        default=5,
        metavar="M",
        help="the race's last look, as --max-seeds (default 5)",
    )
    parser.add_argument("--metric", default="rsum", help="metric to race on (default: rsum)")
    parser.add_argument(
        "--margin",
        type=float,
        default=DEFAULT_MARGIN,
        metavar="D",
        help=f"equivalence margin (default: {DEFAULT_MARGIN:g})",
    )
    parser.add_argument(
        "--spending",
        choices=SPENDING,
        default=DEFAULT_SPENDING,
        help=f"error spending over the looks (default: {DEFAULT_SPENDING})",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the report here")
    parser.set_defaults(handler=_replay)


def _replay(args: argparse.Namespace) -> int:
    runs, saved = source_runs(ReportSource(args.out, args.experiment, args.tracking_uri,
                                           args.record))  # fmt: skip
    if saved is not None:

        def ranks(visible):
            return {run: saved[run] for run in visible["run_id"] if run in saved}
    else:
        ranks = race.RanksCache(runs.attrs["tracking_uri"])
    report = race_replay.replay(
        race_replay.without_verification(runs), args.start_seeds, args.max_seeds, args.metric,
        ranks, margin=args.margin, spending=args.spending,
    )  # fmt: skip
    text = json.dumps(report, indent=2)
    print(text)
    print(race_replay.MARKDOWN_HEADER)
    print(race_replay.markdown_row(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
