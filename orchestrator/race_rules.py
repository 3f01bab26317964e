"""Seed racing's decision rules: after a round, which cells race on, which leave, and the verdict.

These are pure functions of one strategy-selection table (``orchestrator.table.selection_table``
built with the race's ``Design``: its verdicts are the sequential ones, which keep their error
rate over every look the race takes); they read no MLflow and launch nothing, so a live race,
a resumed one and a replay take the same decision on the same table. Per active cell
(``decide``):

- it leaves once its verdict is decided: ``better`` or ``worse`` than the baseline, or
  ``equivalent`` to it (its gain inside +-margin);
- it races on while ``open``, until ``--max-seeds``; a cell still open then is reported open,
  never settled.

``verdict_of`` turns the last table into a ``RaceVerdict``: every decided cell by kind, and
the winner by ``orchestrator.selection.choose`` (the better cell ahead of every other better
cell, raced to the end or gone early, by the same test). The ledger and the loop that run the
rounds are ``orchestrator.race``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from orchestrator.verdicts import BETTER, EQUIVALENT, OPEN, WORSE, leaves_race

BASELINE = "baseline"


@dataclass(frozen=True)
class RaceStep:
    """The decision taken after one round.

    ``kept``: the non-baseline cells that race on, in the order they were given; ``dropped``:
    cell -> why it left the race this round (its verdict); ``leader``: the cell (possibly the
    baseline) with the highest mean, None when nothing finished; ``stop`` and ``reason`` (why
    it stops, or why it goes on); ``next_seeds``: seeds per cell after the next round (==
    ``seeds`` on stop).
    """

    seeds: int
    kept: tuple[str, ...]
    dropped: dict[str, str]
    leader: str | None
    stop: bool
    reason: str
    next_seeds: int


@dataclass(frozen=True)
class RaceVerdict:
    """What a race (or a full grid) concludes: ``winner`` (see ``selection.choose``; None
    without one), ``leader`` (the better cell with the largest gain, else the non-baseline
    cell with the largest gain), and every non-baseline row by verdict, in table order."""

    winner: str | None
    leader: str | None
    better: tuple[str, ...]
    worse: tuple[str, ...]
    equivalent: tuple[str, ...] = ()
    open: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"winner": self.winner, "leader": self.leader, "better": list(self.better),
                "worse": list(self.worse), "equivalent": list(self.equivalent),
                "open": list(self.open)}  # fmt: skip

    def same_as(self, other: RaceVerdict) -> dict[str, bool]:
        """Per part (winner; the sets of better, worse, equivalent cells), whether both agree."""
        return {
            "winner": self.winner == other.winner,
            "better": set(self.better) == set(other.better),
            "worse": set(self.worse) == set(other.worse),
            "equivalent": set(self.equivalent) == set(other.equivalent),
        }


def _rows(table: pd.DataFrame) -> dict[str, dict[str, Any]]:
    return {str(row["pair_set"]): row for row in table.to_dict("records")}


def _num(row: dict[str, Any] | None, key: str) -> float:
    value = None if row is None else row.get(key)
    return math.nan if value is None or pd.isna(value) else float(value)


def _baseline_name(table: pd.DataFrame) -> str | None:
    rows = table[table["is_baseline"].astype(bool)]
    return None if rows.empty else str(rows["pair_set"].iloc[0])


def leader_of(table: pd.DataFrame, cells: Iterable[str], metric: str = "rsum") -> str | None:
    """The cell among ``cells`` and the table's baseline with the highest ``<metric>_mean``
    (cells without a finished run are not candidates); ties go to the baseline, then to the
    cell given first. None when no candidate has a mean."""
    rows = _rows(table)
    baseline = _baseline_name(table)
    candidates = ([baseline] if baseline is not None else []) + [c for c in cells if c != baseline]
    best, best_mean = None, -math.inf
    for name in candidates:
        mean = _num(rows.get(name), f"{metric}_mean")
        if not math.isnan(mean) and mean > best_mean:
            best, best_mean = name, mean
    return best


def decision_reason(row: dict[str, Any]) -> str:
    """``better than the baseline (gain +5.10, 95% CI +2.00..+8.20, adjusted p 0.004)``, or
    the same for worse; ``equivalent: gain +0.40 within ±6 (...)``."""
    interval = f"{_num(row, 'gain_low'):+.2f}..{_num(row, 'gain_high'):+.2f}"
    gain = f"gain {_num(row, 'gain_mean'):+.2f}, 95% CI {interval}"
    if row.get("verdict") == EQUIVALENT:
        return f"equivalent to the baseline ({gain}, adjusted p {_num(row, 'p_equiv_adj'):.3g})"
    return (
        f"{row.get('verdict')} than the baseline ({gain}, adjusted p {_num(row, 'p_diff_adj'):.3g})"
    )


def decide(
    table: pd.DataFrame,
    active: Sequence[str],
    seeds: int,
    max_seeds: int,
    metric: str = "rsum",
) -> RaceStep:
    """The next round's plan from ``table`` (``selection_table`` over the runs the race has so
    far, with the race's design), the non-baseline cells still racing (``active``) and the
    seeds each has.

    A cell whose verdict is better, worse or equivalent leaves with its verdict as the
    reason; an open cell (also one without a finished run yet) is kept. Stops when no cell is
    kept or when ``seeds >= max_seeds``; otherwise the next round brings every kept cell and
    the baseline to ``seeds + 1`` seeds. The leader (for the round's line) is the cell,
    baseline included, with the highest mean among those not worse."""
    rows = _rows(table)
    baseline = _baseline_name(table)
    active = [c for c in active if c != baseline]
    dropped: dict[str, str] = {}
    for cell in active:
        row = rows.get(cell)
        if row is not None and leaves_race(str(row.get("verdict"))):
            dropped[cell] = decision_reason(row)
    kept = [c for c in active if c not in dropped]
    not_worse = [c for c in active if rows.get(c, {}).get("verdict") != WORSE]
    leader = leader_of(table, not_worse, metric)
    if not kept:
        return RaceStep(seeds, (), dropped, leader, True, "settled: every cell is decided", seeds)
    if seeds >= max_seeds:
        reason = f"reached --max-seeds {max_seeds} with {len(kept)} cell(s) still open"
        return RaceStep(seeds, tuple(kept), dropped, leader, True, reason, seeds)
    reason = f"{len(kept)} cell(s) still open"
    return RaceStep(seeds, tuple(kept), dropped, leader, False, reason, seeds + 1)


def verdict_of(table: pd.DataFrame, cells: Iterable[str] = (), metric: str = "rsum") -> RaceVerdict:
    """The verdict over every non-baseline row of ``table`` (see ``RaceVerdict``). ``cells``
    is accepted for callers that name the race's cells; every row counts, raced to the end or
    gone early."""
    from orchestrator.selection import choose

    del cells  # every row is a contender: a cell that left early keeps its verdict
    non_base = [r for r in table.to_dict("records") if not r["is_baseline"]]

    def named(verdict: str) -> tuple[str, ...]:
        return tuple(str(r["pair_set"]) for r in non_base if r.get("verdict") == verdict)

    winner = leader = None
    if (table["seeds"] > 0).any():
        choice = choose(table, metric)
        winner = None if choice.winner is None else str(choice.winner["pair_set"])
        leader = None if choice.leading is None else str(choice.leading["pair_set"])
    return RaceVerdict(winner, leader, named(BETTER), named(WORSE), named(EQUIVALENT),
                       named(OPEN))  # fmt: skip
