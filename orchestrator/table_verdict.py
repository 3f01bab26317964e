"""The selection table's verdict columns (``orchestrator.table``): each cell's paired gains and
their bootstrap resamples -> one test per look (``gain_test``), sequential p-values over the
looks of the table's design (``sequential``), and one family for the whole table
(``verdicts.family_verdicts``).

A fixed grid is one look at each cell's own seeds. A race's design lists the seed counts at
which it looked (``Design.looks``, seeds counted from ``first_seed``): a cell that left the
race after look k has looks 1..k, each on the seeds it had then, so re-reading a finished
race's runs gives back the verdicts the race took.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from orchestrator.gain_test import GainTest, paired_gain_test
from orchestrator.sequential import Design
from orchestrator.verdicts import BASELINE, LookP, family_verdicts, sequential_p

VERDICT_COLUMNS = (
    "gain_se", "gain_low", "gain_high", "eval_share", "p_diff", "p_equiv", "p_diff_seq",
    "p_equiv_seq", "p_diff_adj", "p_equiv_adj", "looks", "verdict", "verdict_note",
)  # fmt: skip


@dataclass(frozen=True)
class PairedCell:
    """One non-baseline row's paired data, seeds in order: ``gains[s]`` = cell - baseline on
    the full eval set; ``boot[s]``: the same under the shared bootstrap resamples (None when
    a run of the pair has no usable eval ranks)."""

    seeds: tuple[str, ...]
    gains: tuple[float, ...]
    boot: tuple[np.ndarray | None, ...]

    def subset(self, count: int) -> tuple[np.ndarray, np.ndarray | None]:
        gains = np.asarray(self.gains[:count], dtype=float)
        boots = self.boot[:count]
        if not boots or any(b is None for b in boots):
            return gains, None
        return gains, np.vstack(boots)


def _seed_number(seed: str) -> int | None:
    return int(seed) if seed.lstrip("-").isdigit() else None


def cell_looks(cell: PairedCell, design: Design | None, first_seed: int) -> list[GainTest]:
    """The cell's test at each look it reached. Without a design: one look at all its seeds.
    With one: look k uses the seeds below ``first_seed + looks[k]``; the cell reached look k
    when it has a seed at or above the previous look's bound."""
    if design is None:
        return [paired_gain_test(*cell.subset(len(cell.seeds)))]
    numbers = [_seed_number(s) for s in cell.seeds]
    tests: list[GainTest] = []
    previous = first_seed
    for look in design.looks:
        bound = first_seed + look
        count = sum(1 for n in numbers if n is not None and n < bound)
        reached = any(n is not None and n >= previous for n in numbers) or not tests
        if not reached:
            break
        # Seeds are in order, so the first ``count`` are those below the bound.
        tests.append(paired_gain_test(*cell.subset(count)))
        previous = bound
    return tests


def _note(test: GainTest, has_boot: bool, verdict: str) -> str:
    if test.n == 0:
        return "no seed paired with the baseline"
    if test.n == 1:
        return "one seed: training noise untested"
    if not has_boot:
        return "no usable eval ranks: eval-set noise untested"
    if math.isnan(test.p_greater(0)):
        return "no spread over seeds or eval images: the test is undefined"
    return "" if verdict != "open" else "not decided yet"


def verdict_columns(
    rows: Sequence[Mapping[str, Any]],
    cells: Sequence[PairedCell | None],
    design: Design | None,
    first_seed: int,
    margin: float,
    alpha: float,
    correction: str,
    confidence: float,
) -> list[dict[str, Any]]:
    """``VERDICT_COLUMNS`` for every row (``cells[i]`` None for the baseline row)."""
    out: list[dict[str, Any]] = []
    last_tests: list[GainTest | None] = []
    means, p_diff, p_equiv = [], [], []
    for row, cell in zip(rows, cells, strict=True):
        if cell is None or row["is_baseline"]:
            last_tests.append(None)
            out.append({**dict.fromkeys(VERDICT_COLUMNS, math.nan), "looks": 0,
                        "verdict": BASELINE, "verdict_note": ""})  # fmt: skip
            continue
        tests = cell_looks(cell, design, first_seed)
        last = tests[-1] if tests else paired_gain_test([], None)
        last_tests.append(last)
        used = design if design is not None else Design((max(last.n, 1),))
        seq = sequential_p([LookP.of(t, margin) for t in tests], used)
        low, high = last.interval(confidence) if last.training_known else (math.nan, math.nan)
        out.append({
            "gain_se": last.se, "gain_low": low, "gain_high": high,
            "eval_share": last.eval_share if last.training_known else math.nan,
            "p_diff": last.p_diff if last.training_known
            else math.nan, "p_equiv": last.p_equiv(margin) if last.training_known else math.nan,
            "p_diff_seq": seq[0], "p_equiv_seq": seq[1], "looks": len(tests),
        })  # fmt: skip
        means.append(last.mean)
        p_diff.append(seq[0])
        p_equiv.append(seq[1])
    family = family_verdicts(means, p_diff, p_equiv, alpha, correction)
    members = iter(range(len(means)))
    for cell, columns, test in zip(cells, out, last_tests, strict=True):
        if test is None:
            continue
        j = next(members)
        verdict = family.verdicts[j]
        columns.update(p_diff_adj=float(family.diff_adj[j]), p_equiv_adj=float(family.equiv_adj[j]),
                       verdict=verdict)  # fmt: skip
        has_boot = cell is not None and bool(cell.boot) and all(b is not None for b in cell.boot)
        columns["verdict_note"] = _note(test, has_boot, verdict)
    return out
