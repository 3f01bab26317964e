"""benchmarks/race_limits.py: the bound on monotone race rules over several draws of a grid,
checked against hand-worked examples."""

from __future__ import annotations

import math

import pytest

NAN = float("nan")


@pytest.fixture
def limits(benchmark_script):
    return benchmark_script("race_limits")


def test_dominance_needs_the_same_sign_a_larger_gain_and_a_smaller_p(limits):
    assert limits.dominates((8.0, 0.10), (6.0, 0.10))
    assert limits.dominates((-8.0, 0.01), (-6.0, 0.20))
    assert not limits.dominates((8.0, 0.11), (6.0, 0.10))  # p larger
    assert not limits.dominates((5.0, 0.01), (6.0, 0.10))  # gain smaller
    assert not limits.dominates((-8.0, 0.01), (6.0, 0.10))  # other sign
    assert limits.dominates((1.0, 0.5), (1.0, NAN))  # no test possible counts as p 1
    assert not limits.dominates((1.0, NAN), (1.0, 0.5))


def two_draws(limits):
    """Draws A and B of cells x, y, z from 2 seeds to 4 (rounds after 2 and after 3 seeds).

    A: x is better only at 4 seeds, y and z end open. B: z is better at 3 seeds, x and y end
    open, and at 3 seeds z already passes its tests."""
    a = limits.Draw(
        "A", "base", ("x", "y", "z"), need={"x": 4, "y": 2, "z": 2},
        evidence={2: {"x": (5.0, 0.20), "y": (8.0, 0.10), "z": (3.0, 0.50)},
                  3: {"x": (5.0, 0.08), "y": (6.0, 0.12), "z": (3.0, 0.40)}},
        passes={2: frozenset(), 3: frozenset()},
        verdict={"x": "better", "y": "open", "z": "open"}, max_seeds=4,
    )  # fmt: skip
    b = limits.Draw(
        "B", "base", ("x", "y", "z"), need={"x": 2, "y": 2, "z": 3},
        evidence={2: {"x": (5.5, 0.15), "y": (1.0, 0.90), "z": (6.0, 0.10)},
                  3: {"x": (5.0, 0.09), "y": (1.0, 0.80), "z": (7.0, 0.01)}},
        passes={2: frozenset(), 3: frozenset({"z"})},
        verdict={"x": "open", "y": "open", "z": "better"}, max_seeds=4,
    )  # fmt: skip
    return a, b


def test_each_draw_alone_keeps_what_dominates_its_own_unsettled_cells(limits):
    a, b = two_draws(limits)
    # A after 2 seeds: x must go on; y (+8, p 0.10) outweighs x (+5, 0.20) and goes on too, z
    # does not. After 3 seeds y (p 0.12) no longer outweighs x (p 0.08): x alone reaches 4.
    seeds, witnesses = limits.forced_seeds([a], 2, 4)
    assert seeds["A"] == {"base": 4, "x": 4, "y": 3, "z": 2}
    assert limits.share(a, seeds["A"]) == 13 / 16
    assert [(w["cell"], w["because"]["cell"]) for w in witnesses] == [("y", "x")]
    # B after 2 seeds: z must go on; x (+5.5, 0.15) does not outweigh z (+6, 0.10).
    seeds, witnesses = limits.forced_seeds([b], 2, 4)
    assert seeds["B"] == {"base": 3, "x": 2, "y": 2, "z": 3}
    assert limits.share(b, seeds["B"]) == 10 / 16 and witnesses == []


def test_one_rule_for_both_draws_keeps_what_either_draw_needs(limits):
    a, b = two_draws(limits)
    seeds, witnesses = limits.forced_seeds([a, b], 2, 4)
    # After 2 seeds B's x (+5.5, 0.15) outweighs A's x (+5, 0.20), which must go on: B pays a
    # third seed for a cell its own verdict leaves open. After 3 seeds B's z would outweigh A's
    # x, but it passes its tests and may leave as settled.
    assert seeds["A"] == {"base": 4, "x": 4, "y": 3, "z": 2}
    assert seeds["B"] == {"base": 3, "x": 3, "y": 2, "z": 3}
    assert limits.share(b, seeds["B"]) == 11 / 16
    # Witnesses name another draw's cell when one is outweighed.
    assert [(w["round_seeds"], w["draw"], w["cell"], w["because"]["draw"], w["because"]["cell"])
            for w in witnesses] == [(2, "A", "y", "B", "z"), (2, "B", "x", "A", "x")]  # fmt: skip
    result = limits.report([a, b], 2, 4)
    rows = {r["draw"]: r for r in result["draws"]}
    # The free floor: every cell its need, the baseline as far as the furthest.
    assert rows["A"]["floor_share"] == (4 + 4 + 2 + 2) / 16
    assert rows["B"]["floor_share"] == (3 + 2 + 2 + 3) / 16
    assert (rows["B"]["alone_share"], rows["B"]["shared_share"]) == (10 / 16, 11 / 16)
    text = limits.markdown(result)
    assert "| B | 1 / 0 | 62% | 62% | 69% |" in text
    assert "after 2 seeds, B x (+5.50, p 0.150) races on because it outweighs A x (+5.00, " \
           "p 0.200), which needs 4 seeds" in text  # fmt: skip


def test_a_draw_read_from_a_grids_runs(limits):
    from test_race import FEWEST_XS, ranked_grid

    # The grid of test_race's fewest-trials test.
    runs, ranks_of = ranked_grid(FEWEST_XS)

    draw = limits.draw_of(runs, "g", 2, 3, "rsum", ranks_of)
    assert draw.need == {"a": 3, "b": 2, "c": 2}
    assert draw.verdict == {"a": "better", "b": "worse", "c": "open"}
    # At 2 seeds a's gains 30, 42: t = 36 / (8.485 / sqrt 2) = 6 on 1 df, p = 1 - 2 atan(6) / pi.
    gain, p = draw.evidence[2]["a"]
    assert gain == pytest.approx(36.0) and p == pytest.approx(1 - 2 * math.atan(6) / math.pi)
    assert draw.evidence[2]["c"][0] == pytest.approx(0.0)  # gains 12, -12
    assert draw.passes[2] == frozenset({"b"})  # -60 at both seeds, no spread
    seeds, _ = limits.forced_seeds([draw], 2, 3)
    assert seeds["g"] == {"base": 3, "a": 3, "b": 2, "c": 2}


def test_bad_seed_counts_are_one_line_errors(limits, capsys):
    assert limits.main(["--grid", "sqlite:////nowhere.db", "e", "--start-seeds", "3",
                        "--max-seeds", "3"]) == 2  # fmt: skip
    assert capsys.readouterr().err.strip() == (
        "race_limits: error: need 2 <= --start-seeds < --max-seeds"
    )
    assert limits.main(["--grid", "sqlite:////nowhere.db", "e", "--grid",
                        "sqlite:////elsewhere.db", "e"]) == 2  # fmt: skip
    assert "share an experiment name" in capsys.readouterr().err
