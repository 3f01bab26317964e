"""From each cell's gain tests to its verdict: better, worse, equivalent or open.

Per cell and look (``orchestrator.gain_test.GainTest``), four one-sided nominal p-values:
the gain is above 0 / below 0 (the difference question) and above -D / below +D (the
equivalence question, TOST). A ``Design`` (``orchestrator.sequential``) turns the p-values
of the looks so far into sequential ones; the difference p is twice the smaller of its two
sides, the equivalence p the larger of its two (an intersection-union test: each side at the
full level). ``closed_test.adjusted`` then controls the whole table's family of 2 x cells
nulls at once. A cell is

- ``better`` / ``worse`` when its difference null is rejected, by the sign of its gain;
- ``equivalent`` when its equivalence null is rejected and its difference null is not (the
  gain lies inside +-D and is not shown to differ from 0; a gain shown to differ but smaller
  than D stays better or worse, and the table shows its interval);
- ``open`` otherwise, and always with fewer than two seeds (training noise untested) or
  without eval ranks (eval-set noise untested).

Pure functions of numbers: the table, the race and the calibration simulation call the same
ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from orchestrator import closed_test
from orchestrator.gain_test import GainTest
from orchestrator.sequential import Design

BASELINE, BETTER, WORSE, EQUIVALENT, OPEN = "baseline", "better", "worse", "equivalent", "open"
VERDICTS = (BASELINE, BETTER, WORSE, EQUIVALENT, OPEN)
DECIDED = (BETTER, WORSE, EQUIVALENT)
DEFAULT_ALPHA = 0.05
# The equivalence margin D, in rsum: a gain inside +-6 is less than one point of mean recall
# (rsum sums six recalls), the smallest difference retrieval results are read as a change;
# docs/method.md gives the argument and why the eval set must resolve well below it.
DEFAULT_MARGIN = 6.0


@dataclass(frozen=True)
class LookP:
    """A look's nominal one-sided p-values: ``above``/``below`` 0 and ``above_low`` (-D) /
    ``below_high`` (+D). All NaN when the look cannot be tested."""

    above: float
    below: float
    above_low: float
    below_high: float

    @classmethod
    def of(cls, test: GainTest, margin: float) -> LookP:
        if not test.training_known:
            return cls(math.nan, math.nan, math.nan, math.nan)
        return cls(test.p_greater(0), test.p_less(0), test.p_greater(-margin),
                   test.p_less(margin))  # fmt: skip


def sequential_p(looks: Sequence[LookP], design: Design) -> tuple[float, float]:
    """``(p_diff, p_equiv)`` of one cell over its looks so far (first look first)."""
    if not looks:
        return (math.nan, math.nan)

    def side(name: str) -> float:
        return design.sequential_p([getattr(look, name) for look in looks])

    above, below = side("above"), side("below")
    low, high = side("above_low"), side("below_high")
    p_diff = math.nan if math.isnan(above) or math.isnan(below) else min(1.0, 2 * min(above, below))
    p_equiv = math.nan if math.isnan(low) or math.isnan(high) else max(low, high)
    return (p_diff, p_equiv)


@dataclass(frozen=True)
class FamilyVerdict:
    """Per cell, in the order given: the adjusted p-values and the verdict."""

    diff_adj: np.ndarray
    equiv_adj: np.ndarray
    verdicts: tuple[str, ...]


def family_verdicts(
    means: Sequence[float],
    p_diff: Sequence[float],
    p_equiv: Sequence[float],
    alpha: float = DEFAULT_ALPHA,
    correction: str = "holm",
) -> FamilyVerdict:
    """The verdict of every cell of one table from its mean gain and its (sequential)
    difference and equivalence p-values; NaN p-values give ``open``."""
    diff_adj, equiv_adj = closed_test.adjusted(p_diff, p_equiv, correction)
    verdicts = []
    for mean, d, e in zip(means, diff_adj, equiv_adj, strict=True):
        if d < alpha and mean > 0:
            verdicts.append(BETTER)
        elif d < alpha and mean < 0:
            verdicts.append(WORSE)
        elif e < alpha:
            verdicts.append(EQUIVALENT)
        else:
            verdicts.append(OPEN)
    return FamilyVerdict(diff_adj, equiv_adj, tuple(verdicts))


def leaves_race(verdict: str) -> bool:
    """A cell leaves a race once it is decided; an open one gets another seed."""
    return verdict in DECIDED


@dataclass(frozen=True)
class SeedsNeeded:
    """A planning guess for an open cell: ``seeds`` at which a cell whose gain, spread over
    seeds and eval-set variance stay what they are now would be decided (``decision``:
    "differs" or "equivalent"), None when no number up to the cap decides it; ``eval_bound``
    True when the eval-set variance alone keeps it open (more eval images, not more seeds)."""

    seeds: int | None
    decision: str | None
    eval_bound: bool


def seeds_to_decide(
    mean: float,
    seed_sd: float,
    eval_var: float,
    level: float,
    margin: float,
    max_seeds: int = 30,
) -> SeedsNeeded:
    """The fewest seeds n >= 2 at which the fixed-sample test (``GainTest``: tau = sd^2 / n,
    C = ``eval_var``) rejects "gain = 0" or "|gain| >= margin" at ``level`` (e.g. alpha over
    the family: Holm's first, strictest step). It takes the observed numbers as true, so it
    is a guide, not a promise."""
    if any(math.isnan(x) for x in (mean, seed_sd, eval_var)):
        return SeedsNeeded(None, None, False)
    for n in range(2, max_seeds + 1):
        test = GainTest(n, mean, seed_sd**2 / n, eval_var)
        if test.p_diff < level:
            return SeedsNeeded(n, "differs", False)
        if test.p_equiv(margin) < level:
            return SeedsNeeded(n, "equivalent", False)
    limit = GainTest(2, mean, 0.0, eval_var)  # infinitely many seeds: the eval part alone
    bound = not (limit.p_diff < level or limit.p_equiv(margin) < level)
    return SeedsNeeded(None, None, bound)
