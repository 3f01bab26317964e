"""The paper's three observations (docs/method.md) tested on a single_additions grid over seeds.

Reads the grid's trials from MLflow (FINISHED runs, rsum at the end of each) and prints, as
Markdown, paired differences over the seeds both cells share (95% Student-t intervals, two-sided
paired t-test):

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
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import trainers  # noqa: E402,F401  (torchvision compat before anything imports open_clip)
from orchestrator import stats, tracking  # noqa: E402
from orchestrator.table import selection_table  # noqa: E402

TEACHER_STUDENT = ("inter_ts", "intra_ts")
LEARNING_TYPES = ("inter_ts", "intra_ts", "inter_ss", "intra_ss")


def metric_by_seed(runs: pd.DataFrame, metric: str = "rsum") -> pd.DataFrame:
    """Pair set x seed table of ``metric``: the per-seed values the grid's own table reads
    (``selection_table``'s ``<metric>_by_seed``: FINISHED runs, the latest run per seed)."""
    table = selection_table(runs, metric)
    by_seed = {row.pair_set: row[f"{metric}_by_seed"] for _, row in table.iterrows()}
    frame = pd.DataFrame.from_dict(by_seed, orient="index")
    frame.columns = frame.columns.astype(int)
    return frame.sort_index(axis=1)


def paired(by_seed: pd.DataFrame, first: str, second: str) -> dict[str, Any]:
    """``first`` minus ``second`` seed for seed over their common seeds: n, mean, 95% t
    interval and the paired t-test's two-sided p."""
    diffs = (by_seed.loc[first] - by_seed.loc[second]).dropna().to_numpy()
    mean, _, low, high = stats.t_interval(diffs)
    return {"first": first, "second": second, "n": int(diffs.size), "mean": mean,
            "low": low, "high": high, "p": stats.t_test_p(diffs)}  # fmt: skip


def cell(baseline: str, learning_type: str, strategy: str) -> str:
    return f"{baseline}+{learning_type}:{strategy}"


def sym_versus_standard(by_seed: pd.DataFrame, baseline: str) -> list[dict[str, Any]]:
    """Observation 1: standard minus Sym per teacher-student pair, Holm over those present."""
    rows = [
        paired(by_seed, cell(baseline, lt, s), cell(baseline, lt, f"sym_{s}"))
        for lt in TEACHER_STUDENT
        for s in ("sd", "kl")
        if {cell(baseline, lt, s), cell(baseline, lt, f"sym_{s}")} <= set(by_seed.index)
    ]
    adjusted = stats.adjust_pvalues(np.array([r["p"] for r in rows]), "holm") if rows else []
    for row, p_adj in zip(rows, adjusted, strict=True):
        row["p_holm"] = float(p_adj)
    return rows


def loss_spread(by_seed: pd.DataFrame, baseline: str) -> list[dict[str, Any]]:
    """Observation 2: per learning type, its best minus its worst cell by mean."""
    rows = []
    means = by_seed.mean(axis=1)
    for lt in LEARNING_TYPES:
        cells = [name for name in by_seed.index if name.startswith(f"{baseline}+{lt}:")]
        if len(cells) < 2:
            continue
        ordered = means[cells].sort_values(ascending=False)
        rows.append({"learning_type": lt, **paired(by_seed, ordered.index[0], ordered.index[-1])})
    return rows


def _line(row: dict[str, Any], extra: str = "") -> str:
    first, second = (name.split("+", 1)[-1] for name in (row["first"], row["second"]))
    return (f"| `{first}` - `{second}` | {row['n']} | {row['mean']:+.2f} "
            f"[{row['low']:+.2f}, {row['high']:+.2f}] | {row['p']:.3f}{extra} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--baseline", default="baseline", help="the baseline's pair set name")
    parser.add_argument("--metric", default="rsum")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/paper_observations.json"))
    args = parser.parse_args()

    by_seed = metric_by_seed(tracking.runs_frame(args.tracking_uri, args.experiment), args.metric)
    first = sym_versus_standard(by_seed, args.baseline)
    second = loss_spread(by_seed, args.baseline)
    print("1. standard minus Sym, teacher-student edges (Holm over these)\n")
    print("| difference | n | mean [95% CI seeds] | p (Holm) |\n|---|---:|---:|---:|")
    for row in first:
        print(_line(row, f" ({row['p_holm']:.3f})"))
    print("\n2. best minus worst loss per learning type (picked after looking)\n")
    print("| difference | n | mean [95% CI seeds] | p |\n|---|---:|---:|---:|")
    for row in second:
        print(_line(row))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"sym_vs_standard": first, "loss_spread": second}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
