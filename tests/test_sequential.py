"""Group-sequential boundaries against published values and a Monte Carlo of the score process;
the closed diff/equivalence family and the verdicts on hand-made p-values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from orchestrator import closed_test
from orchestrator.sequential import Design, boundaries, spent
from orchestrator.verdicts import (
    BETTER,
    EQUIVALENT,
    OPEN,
    WORSE,
    LookP,
    family_verdicts,
    leaves_race,
    sequential_p,
)

FIVE = tuple(np.arange(1, 6) / 5)


def _boundaries(spending: str, a: float, fractions=FIVE) -> np.ndarray:
    cumulative = [spent(a, t, spending) for t in fractions]
    return boundaries(fractions, tuple(np.diff([0.0, *cumulative])))


def test_lan_demets_boundaries_match_the_published_tables():
    # Five equally spaced looks, one-sided 0.025 (Jennison and Turnbull, table 7.6; gsDesign):
    # O'Brien-Fleming type 4.877, 3.357, 2.680, 2.290, 2.031; Pocock type 2.438, 2.427,
    # 2.410, 2.397, 2.389.
    obf = _boundaries("obf", 0.025)
    pocock = _boundaries("pocock", 0.025)
    assert obf == pytest.approx([4.877, 3.357, 2.680, 2.290, 2.031], abs=2e-3)
    assert pocock == pytest.approx([2.438, 2.427, 2.410, 2.397, 2.389], abs=4e-3)
    # Spending: all of a by the end, almost nothing at the first of five looks for OBF.
    assert spent(0.05, 1.0, "obf") == pytest.approx(0.05)
    assert spent(0.05, 1.0, "pocock") == pytest.approx(0.05)
    # z_{1 - 0.0125} = 2.241403, sqrt(0.2) = 0.4472136
    first = 2 * scipy_stats.norm.sf(2.241403 / 0.4472136)
    assert spent(0.025, 0.2, "obf") == pytest.approx(first, rel=1e-5)


def test_crossing_probability_is_the_level_in_a_monte_carlo():
    design = Design((2, 3, 4, 5))
    t = np.array(design.looks) / design.looks[-1]
    rng = np.random.default_rng(0)
    steps = rng.normal(size=(200_000, 4)) * np.sqrt(np.diff([0.0, *t]))
    z = np.cumsum(steps, axis=1) / np.sqrt(t)
    for a in (0.05, 0.01):
        c = scipy_stats.norm.isf(design.nominal_levels(a))
        rate = float((z >= c).any(axis=1).mean())
        assert rate == pytest.approx(a, abs=4 * math.sqrt(a / 200_000))


def test_sequential_p_inverts_the_nominal_levels():
    design = Design.race(2, 5)
    assert design.looks == (2, 3, 4, 5)
    for a in (0.05, 0.003, 1e-4):
        levels = design.nominal_levels(a)
        for k in range(4):
            p = [math.nan] * k + [float(levels[k])]
            assert design.sequential_p(p) == pytest.approx(a, rel=2e-3)
    # Crossing earlier counts: the smallest level over the looks so far.
    late = design.sequential_p([0.5, 0.5, 0.5, float(design.nominal_levels(0.01)[3])])
    early = design.sequential_p([0.5, float(design.nominal_levels(0.002)[1]), 0.9, 0.9])
    assert late == pytest.approx(0.01, rel=2e-3) and early == pytest.approx(0.002, rel=2e-3)
    # One look: the nominal p is the sequential p; no p-value at any look: NaN.
    assert Design((5,)).sequential_p([0.0123]) == 0.0123
    assert math.isnan(design.sequential_p([math.nan, math.nan]))
    assert design.sequential_p([0.999]) == 1.0
    with pytest.raises(ValueError):
        Design((3, 2))
    with pytest.raises(ValueError):
        Design((2, 3), spending="linear")


def test_closed_family_by_hand():
    # Cell A: diff 0.01, equiv 0.6; cell B: diff 0.02, equiv 0.9; cell C: diff 0.8, equiv 0.03.
    # For A's diff null the family is {0.01, max(B) = 0.9, max(C) = 0.8}: Holm step 1 is
    # 3 x 0.01 = 0.03. For B's diff: {0.02, 0.6, 0.8}: 3 x 0.02 = 0.06. For C's equiv:
    # {0.03, 0.6, 0.9}: 0.09. For A's equiv 0.6: {0.6, 0.8, 0.9} sorted -> 3 x 0.6 = 1.8 -> 1.
    diff, equiv = closed_test.adjusted([0.01, 0.02, 0.8], [0.6, 0.9, 0.03])
    assert diff == pytest.approx([0.03, 0.06, 1.0])
    assert equiv == pytest.approx([1.0, 1.0, 0.09])
    # Holm over the three difference p-values alone gives the same 0.03 for A: asking the
    # equivalence question too costs nothing (Holm over all six would give 6 x 0.01).
    # A later step: cell B's diff 0.02 behind a cell whose larger p is 0.001.
    diff, _ = closed_test.adjusted([0.001, 0.02], [0.0005, 0.7])
    assert diff[1] == pytest.approx(max(2 * 0.001, 1 * 0.02))
    # NaN cells are not members; BH over the 2m values by hand.
    diff, equiv = closed_test.adjusted([0.01, math.nan], [0.5, math.nan])
    assert diff[0] == pytest.approx(0.01) and math.isnan(diff[1]) and math.isnan(equiv[1])
    diff, equiv = closed_test.adjusted([0.01, 0.04], [0.5, 0.03], "bh")
    # sorted 0.01, 0.03, 0.04, 0.5 (m = 4): 4 x 0.01 = 0.04, min(4/2 x 0.03, ...) = 0.053...
    assert diff == pytest.approx([0.04, 0.04 * 4 / 3])
    assert equiv == pytest.approx([0.5, 0.04 * 4 / 3])
    with pytest.raises(ValueError):
        closed_test.adjusted([0.1], [0.1], "bonferroni")


def test_verdicts_from_adjusted_p_values():
    result = family_verdicts(
        means=[4.0, -3.0, 0.5, 1.0, 2.0],
        p_diff=[0.001, 0.002, 0.9, math.nan, 0.004],
        p_equiv=[0.9, 0.8, 0.001, math.nan, 0.002],
    )
    assert result.verdicts == (BETTER, WORSE, EQUIVALENT, OPEN, BETTER)
    assert [leaves_race(v) for v in result.verdicts] == [True, True, True, False, True]


def test_look_p_values_and_their_sequential_combination():
    from orchestrator.gain_test import paired_gain_test

    gains = np.array([1.0, 2.0, 3.0])
    test = paired_gain_test(gains, np.repeat(gains[:, None], 5, axis=1))
    look = LookP.of(test, margin=6.0)
    se = scipy_stats.sem(gains)
    assert look.above == pytest.approx(scipy_stats.t.sf(2 / se, 2), rel=1e-4)
    assert look.below_high == pytest.approx(scipy_stats.t.cdf((2 - 6) / se, 2), rel=1e-4)
    p_diff, p_equiv = sequential_p([look], Design((3,)))
    assert p_diff == pytest.approx(2 * look.above)
    assert p_equiv == pytest.approx(max(look.above_low, look.below_high))
    one = paired_gain_test([2.0], np.array([[1.0, 3.0, 2.0]]))
    assert math.isnan(LookP.of(one, 6.0).above)  # one seed: training noise untested
