"""The paper's observations (docs/method.md) tested on a single-additions grid over seeds.

From each cell's per-seed values (FINISHED runs, the metric at the end of each, as the grid's own
table reads them), paired differences over the seeds both cells share (95% Student-t intervals,
two-sided paired t-test):

1. standard minus Sym on the teacher-student edges (``inter_ts``, ``intra_ts`` x ``sd``, ``kl``),
   Holm-adjusted over those comparisons;
2. per learning type, its best minus its worst loss by mean (chosen after looking, so a size of
   the spread rather than a planned test).

The third (every significant gain combines into the recipe) needs the recipe trained on the
same seeds: ``conaclip best --verify``. Cells are named as the presets name single additions,
``<baseline>+<learning type>:<strategy>`` (``cell``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from orchestrator import race_replay, stats
from orchestrator.reports import ReportSource, source_runs
from orchestrator.table import selection_table
from trainers.errors import InputError

TEACHER_STUDENT = ("inter_ts", "intra_ts")
# The paper's order, which the rows of observation 2 follow (not trainers.graph's).
LEARNING_TYPES = ("inter_ts", "intra_ts", "inter_ss", "intra_ss")


def _by_seed(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    by_seed = {row.pair_set: row[f"{metric}_by_seed"] for _, row in table.iterrows()}
    frame = pd.DataFrame.from_dict(by_seed, orient="index")
    frame.columns = frame.columns.astype(int)
    return frame.sort_index(axis=1)


def metric_by_seed(runs: pd.DataFrame, metric: str = "rsum") -> pd.DataFrame:
    """Pair set x seed table of ``metric``: the per-seed values the grid's own table reads
    (``selection_table``'s ``<metric>_by_seed``: FINISHED runs, the latest run per seed)."""
    return _by_seed(selection_table(runs, metric), metric)


def paired(by_seed: pd.DataFrame, first: str, second: str) -> dict[str, Any]:
    """``first`` minus ``second`` seed for seed over their common seeds: n, mean, 95% t
    interval and the paired t-test's two-sided p."""
    diffs = (by_seed.loc[first] - by_seed.loc[second]).dropna().to_numpy()
    mean, _, low, high = stats.t_interval(diffs)
    return {"first": first, "second": second, "n": int(diffs.size), "mean": mean,
            "low": low, "high": high, "p": stats.t_test_p(diffs)}  # fmt: skip


def cell(baseline: str, learning_type: str, strategy: str) -> str:
    """The name of the single addition of ``learning_type:strategy`` to ``baseline``."""
    return f"{baseline}+{learning_type}:{strategy}"


def sym_versus_standard(by_seed: pd.DataFrame, baseline: str) -> list[dict[str, Any]]:
    """Observation 1: standard minus Sym per teacher-student pair (``paired`` rows with
    ``p_holm``), Holm over the pairs whose two cells are both in ``by_seed``."""
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
    """Observation 2: per learning type with at least two cells, its best minus its worst cell
    by mean (a ``paired`` row with its ``learning_type``)."""
    rows = []
    means = by_seed.mean(axis=1)
    for lt in LEARNING_TYPES:
        cells = [name for name in by_seed.index if name.startswith(f"{baseline}+{lt}:")]
        if len(cells) < 2:
            continue
        ordered = means[cells].sort_values(ascending=False)
        rows.append({"learning_type": lt, **paired(by_seed, ordered.index[0], ordered.index[-1])})
    return rows


@dataclass(frozen=True)
class Observations:
    """Both observations on one grid, by ``metric``, with ``baseline`` the pair set added to."""

    experiment: str | None
    baseline: str
    metric: str
    sym_vs_standard: list[dict[str, Any]]
    loss_spread: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the two observations' rows."""
        return {"sym_vs_standard": self.sym_vs_standard, "loss_spread": self.loss_spread}


def observe(runs: pd.DataFrame, baseline: str | None = None, metric: str = "rsum") -> Observations:
    """Both observations on ``runs`` (``tracking.runs_frame`` layout). ``baseline``: the pair
    set the cells add to (None: the one tagged ``conaclip.baseline``). InputError when the
    runs hold no trial, lack ``metric``, or have no such baseline."""
    table = selection_table(runs, metric)
    by_seed = _by_seed(table, metric)
    if baseline is None:
        tagged = table.loc[table["is_baseline"].astype(bool), "pair_set"].tolist()
        if not tagged:
            raise InputError("no pair set tagged conaclip.baseline; name it with --baseline")
        baseline = str(tagged[0])
    elif baseline not in by_seed.index:
        where = runs.attrs.get("experiment") or "the runs"
        raise InputError(f"--baseline {baseline}: no pair set of that name in {where}; "
                         f"expected one of {', '.join(map(str, by_seed.index))}")  # fmt: skip
    return Observations(
        runs.attrs.get("experiment"),
        baseline,
        metric,
        sym_versus_standard(by_seed, baseline),
        loss_spread(by_seed, baseline),
    )


def observe_source(
    source: ReportSource, baseline: str | None = None, metric: str = "rsum"
) -> Observations:
    """``observe`` on the runs of ``source`` (a grid record, or an experiment of a store),
    less those of ``conaclip best --verify`` (its recipe is no single addition)."""
    runs, _ = source_runs(source)
    return observe(race_replay.without_verification(runs), baseline, metric)


def _line(row: dict[str, Any], extra: str = "") -> str:
    first, second = (name.split("+", 1)[-1] for name in (row["first"], row["second"]))
    return (f"| `{first}` - `{second}` | {row['n']} | {row['mean']:+.2f} "
            f"[{row['low']:+.2f}, {row['high']:+.2f}] | {row['p']:.3f}{extra} |")  # fmt: skip


def markdown(observations: Observations) -> str:
    """Both observations as two Markdown tables under their headings."""
    lines = [
        "1. standard minus Sym, teacher-student edges (Holm over these)\n",
        "| difference | n | mean [95% CI seeds] | p (Holm) |\n|---|---:|---:|---:|",
        *(_line(row, f" ({row['p_holm']:.3f})") for row in observations.sym_vs_standard),
        "\n2. best minus worst loss per learning type (picked after looking)\n",
        "| difference | n | mean [95% CI seeds] | p |\n|---|---:|---:|---:|",
        *(_line(row) for row in observations.loss_spread),
    ]
    return "\n".join(lines) + "\n"


def empty_notes(observations: Observations) -> list[str]:
    """One line per observation the grid holds no cells for, saying which cells it needs."""
    notes = []
    base = observations.baseline
    if not observations.sym_vs_standard:
        notes.append(
            f"observation 1: no standard and Sym cell of one teacher-student pair (e.g. "
            f"{cell(base, 'inter_ts', 'sd')} and {cell(base, 'inter_ts', 'sym_sd')})"
        )
    if not observations.loss_spread:
        notes.append(
            f"observation 2: no learning type with two cells (e.g. {cell(base, 'inter_ts', 'sd')} "
            f"and {cell(base, 'inter_ts', 'kl')})"
        )
    return notes
