"""The paper's three observations (docs/method.md) tested on a single_additions grid over seeds.

A driver of ``orchestrator.paper_observations`` (what ``conaclip observations`` runs): reads the
grid's trials from MLflow (FINISHED runs, rsum at the end of each) and prints, as Markdown,
paired differences over the seeds both cells share (95% Student-t intervals, two-sided paired
t-test):

1. standard minus Sym on the teacher-student edges (``inter_ts``, ``intra_ts`` x ``sd``, ``kl``),
   Holm-adjusted over those four comparisons;
2. per learning type, its best minus its worst loss by mean rsum (chosen after looking, so a
   size of the spread rather than a planned test).

The third (every significant gain combines into the recipe) needs the recipe trained on the
same seeds: ``conaclip best --verify``.

    python benchmarks/paper_observations.py --tracking-uri sqlite:///$PWD/runs/grid8/mlruns.db \\
        --experiment sa8 --out runs/bench/paper_observations-sa8.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import trainers  # noqa: E402,F401  (torchvision compat before anything imports open_clip)
from orchestrator import paper_observations  # noqa: E402
from orchestrator.reports import ReportSource  # noqa: E402
from trainers.errors import InputError  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--baseline", default="baseline", help="the baseline's pair set name")
    parser.add_argument("--metric", default="rsum")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/paper_observations.json"))
    args = parser.parse_args()

    source = ReportSource(experiment=args.experiment, tracking_uri=args.tracking_uri)
    try:
        found = paper_observations.observe_source(source, args.baseline, args.metric)
    except InputError as error:
        print(f"paper_observations: error: {error}", file=sys.stderr)
        return 2
    print(paper_observations.markdown(found), end="")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(found.as_dict(), indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
