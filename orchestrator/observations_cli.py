"""`conaclip observations`: flags in, one call to ``orchestrator.paper_observations``, the
two observations printed as Markdown (and written as JSON with ``--json``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from orchestrator import paper_observations
from orchestrator.cli_flags import add_ablation_source_flags
from orchestrator.reports import ReportSource


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``observations``; its handler returns the exit code, bad input raises InputError."""
    parser = subparsers.add_parser(
        "observations",
        help="the paper's observations tested on a single-additions grid",
        description="Test two of the paper's observations on a grid over seeds, from each "
        "cell's per-seed values (FINISHED runs, as `conaclip table` reads them), as paired "
        "differences over the seeds both cells share (95% t interval, paired t-test): "
        "1. standard minus Sym on the teacher-student edges (inter_ts, intra_ts x sd, kl), "
        "Holm-adjusted over those; 2. per learning type, its best minus its worst loss by "
        "mean (picked after looking: a size, not a planned test). Cells are the single "
        "additions BASELINE+<learning type>:<strategy>; an observation whose cells the grid "
        "lacks is named on stderr. The third observation (the significant gains combine) is "
        "`conaclip best --verify`. Reads a finished ablation's MLflow store or a grid record "
        "(--from DIR).",
    )
    add_ablation_source_flags(parser)
    parser.add_argument(
        "--baseline",
        metavar="NAME",
        help="the pair set the cells add to (default: the one tagged as the baseline)",
    )
    parser.add_argument("--metric", default="rsum", help="metric to compare by (default: rsum)")
    parser.add_argument(
        "--json", type=Path, metavar="FILE", help="also write both observations' rows as JSON"
    )
    parser.set_defaults(handler=_observations)


def _observations(args: argparse.Namespace) -> int:
    source = ReportSource(args.out, args.experiment, args.tracking_uri, args.record)
    found = paper_observations.observe_source(source, args.baseline, args.metric)
    sys.stdout.write(paper_observations.markdown(found))
    for note in paper_observations.empty_notes(found):
        print(note, file=sys.stderr)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(found.as_dict(), indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
