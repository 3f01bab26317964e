"""Seed racing: the decision on hand-built tables, the loop replayed on hand-built runs through
the real selection table, the replay benchmark on a real SQLite MLflow store, and
`conaclip ablate --race` end to end on a real local Ray cluster (then resumed: no new trial)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from test_ablation import data_flags  # the same tiny data and teacher flags

from orchestrator import race
from orchestrator.cli import main
from trainers.errors import InputError

NAN = math.nan
ROOT = Path(__file__).resolve().parents[1]
# Student-t quantiles t_{0.975, df}, the half-width factors of the table's 95% intervals.
T1, T2 = 12.706204736174698, 4.302652729749464


def row(name, mean, low, high, verdict="open", *, baseline=False, seeds=2, gain=NAN,
        gain_low=NAN, gain_high=NAN, gain_std=NAN, p=NAN, p_raw=NAN, by_seed=None):  # fmt: skip
    """One table row with the columns the race reads (selection_table's contract)."""
    return {
        "rsum_by_seed": {str(s): v for s, v in enumerate(by_seed)} if by_seed else {},
        "pair_set": name, "pairs": name, "is_baseline": baseline, "seeds": seeds,
        "rsum_mean": mean, "rsum_ci_low": low, "rsum_ci_high": high,
        "gain_n": pd.NA if baseline else seeds, "gain_mean": gain, "gain_std": gain_std,
        "gain_ci_low": gain_low,
        "gain_ci_high": gain_high, "p_seed": p_raw, "p_seed_adj": p, "p_boot_adj": p,
        "verdict": "baseline" if baseline else verdict,
    }  # fmt: skip


def table(*rows):
    return pd.DataFrame(list(rows))


BASE = row("base", 90.0, 88.0, 92.0, baseline=True)


# ------------------------------------------------------------------------------ decide
def test_clearly_worse_cell_is_dropped_with_its_reason():
    t = table(
        BASE,
        row("a", 91.0, 85.0, 97.0),
        row("w", 70.0, 60.0, 80.0, "worse", gain=-20.0, gain_low=-22.5, gain_high=-17.5, p=0.012),
    )
    step = race.decide(t, ["a", "w"], seeds=2, max_seeds=5)
    assert step.kept == ("a",)
    assert step.dropped == {
        "w": "worse than the baseline (gain -20.00, 95% CI -22.50..-17.50, adjusted p 0.012)"
    }
    assert step.leader == "a"
    # The leader is still open against the baseline: one more seed for it and the baseline.
    assert (step.stop, step.next_seeds) == (False, 3)
    assert race.round_plan("base", step.kept, step.next_seeds) == [
        ("base", 0), ("a", 0), ("base", 1), ("a", 1), ("base", 2), ("a", 2)
    ]  # fmt: skip


def test_worse_is_dropped_even_when_its_interval_reaches_the_leader():
    # A paired test can call a cell worse although its own interval overlaps everyone's.
    t = table(BASE, row("a", 91.0, 80.0, 102.0), row("w", 88.0, 70.0, 106.0, "worse", p=0.01))
    step = race.decide(t, ["a", "w"], seeds=3, max_seeds=5)
    assert step.kept == ("a",) and list(step.dropped) == ["w"]


def test_a_cell_dropped_as_worse_cannot_lead():
    # x has the top mean but its paired gain is significantly negative (it ran seeds the
    # baseline lacks); the leader is a. b lies below a's interval, but its verdict is open (it
    # may still turn worse, which the verdict reports too): it races on.
    t = table(BASE, row("x", 95.0, 94.0, 96.0, "worse", p=0.01), row("a", 91.0, 89.0, 93.0),
              row("b", 80.0, 78.0, 82.0))  # fmt: skip
    step = race.decide(t, ["x", "a", "b"], seeds=3, max_seeds=5)
    assert step.leader == "a" and list(step.dropped) == ["x"] and step.kept == ("a", "b")
    # Once b is better (its question settled) and still below a's interval, it leaves.
    t.loc[t["pair_set"] == "b", "verdict"] = "better"
    step = race.decide(t, ["x", "a", "b"], seeds=3, max_seeds=5)
    assert step.dropped["b"] == (
        "better, and its rsum CI high 82.00 is below the CI low 89.00 of the leader a"
    )


def test_hand_computed_intervals_from_the_real_table_drop_the_cell_below_the_leader():
    # seeds 0..2: baseline 90,91,92; a 95,96,97; b 80,81,82; c 93,97,90. Each sd over seeds
    # is 1 for the first three: CI = mean -/+ T2 / sqrt(3) = mean -/+ 2.4841.
    # c: mean 93.3333, sd sqrt(37/3) = 3.5119, CI 93.3333 -/+ 8.7241 = 84.6092..102.0575.
    runs = grid_runs({"base": [90, 91, 92], "a": [95, 96, 97], "b": [80, 81, 82],
                      "c": [93, 97, 90]})  # fmt: skip
    t = race.race_table(runs, "rsum")
    rows = t.set_index("pair_set")
    assert rows.loc["a", "rsum_ci_low"] == pytest.approx(96 - T2 / math.sqrt(3))
    assert rows.loc["c", "rsum_ci_high"] == pytest.approx(
        93 + 1 / 3 + T2 * 3.5118845842842 / 3**0.5
    )
    # Far from --max-seeds, so c (gains 3, 6, -2: +2.33 +- 4.04) is not futile yet (at 5
    # seeds it would be: test_futile_cells_leave_before_the_last_round).
    step = race.decide(t, ["a", "b", "c"], seeds=3, max_seeds=20)
    assert step.leader == "a"
    # b: 81 + 2.4841 = 83.4841 < 93.5159 (a's low): it cannot be the best, but with no
    # bootstrap ranks its verdict is open (it may still turn worse), so it races on.
    assert step.dropped == {}
    assert step.kept == ("a", "b", "c")
    assert not step.stop and step.next_seeds == 4
    assert step.reason == "2 cell(s) not yet told apart from the leader a"


def test_friedman_drops_what_ranks_over_seeds_rule_out_and_never_the_baseline():
    # The hand-computed example of test_stats: rank sums a 12, base 7, b 5 over 4 seeds,
    # Friedman T 6.5 (p = exp(-3.25) = 0.0388), Conover's critical difference 3.4605.
    # Intervals overlap (b's high 6.5 >= a's low 6.0), so only the ranks drop b, whose verdict
    # is settled (hand-built "better": ranks and verdicts come from different columns); the
    # baseline (7 < 12 - 3.46) is below the bar too but is the reference and stays.
    t = table(
        row("base", 4.75, 1.0, 8.5, baseline=True, seeds=4, by_seed=[5.0, 6.0, 7.0, 1.0]),
        row("a", 8.625, 6.0, 11.0, seeds=4, by_seed=[10.0, 8.0, 9.5, 7.0]),
        row("b", 2.5, 0.5, 6.5, "better", seeds=4, by_seed=[1.0, 2.0, 3.0, 4.0]),
    )
    step = race.decide(t, ["a", "b"], seeds=4, max_seeds=6)
    assert step.dropped == {"b": "better, and rank sum 5 < 8.54, F-Race"}
    assert step.ranking == (
        "Friedman p 0.0388 over 3 cells x seeds 0..3, top rank sum 12 (a), Conover's critical "
        "difference 3.46: below 8.54 cannot be the best"
    )
    assert step.kept == ("a",) and step.leader == "a" and not step.stop
    # At level 0.01 Friedman's test is not significant: nothing is dropped on ranks.
    strict = race.decide(t, ["a", "b"], seeds=4, max_seeds=6, alpha=0.01)
    assert strict.dropped == {}
    assert strict.ranking == (
        "Friedman p 0.0388 over 3 cells x seeds 0..3: not significant, nothing dropped on ranks"
    )


def test_a_cell_ahead_of_the_baseline_races_on_although_ranks_rule_it_out():
    # Same ranks as above, but c's verdict is open: it may still become significantly better
    # (or worse), so it races on although it cannot be the best.
    t = table(
        row("base", 4.75, 1.0, 8.5, baseline=True, seeds=4, by_seed=[5.0, 6.0, 7.0, 1.0]),
        row("a", 8.625, 6.0, 11.0, seeds=4, by_seed=[10.0, 8.0, 9.5, 7.0]),
        row("c", 2.5, 0.5, 6.5, seeds=4, gain=0.5, by_seed=[1.0, 2.0, 3.0, 4.0]),
    )
    step = race.decide(t, ["a", "c"], seeds=4, max_seeds=6)
    assert step.dropped == {} and step.kept == ("a", "c")
    assert "below 8.54 cannot be the best" in step.ranking


def test_futile_cells_leave_before_the_last_round():
    # At 5 seeds a gain clears the uncorrected paired t-test when t_{0.975,4} * sd / sqrt(5)
    # = 2.7764 * sd / 2.2361 = 1.2416 * sd < |mean|. a: gains 1, 3 (+2 +- 1.4142): 1.7559 < 2,
    # races on; b: gains 1, 5 (+3 +- 2.8284): 3.5119 >= 3, futile; c the mirror image of b
    # (-3 +- 2.8284), futile too; d ran one seed: no spread, nothing known yet.
    wide = {"low": 60.0, "high": 120.0}
    t = table(
        BASE,
        row("a", 92.0, **wide, gain=2.0, gain_std=2**0.5),
        row("b", 93.0, **wide, gain=3.0, gain_std=8**0.5),
        row("c", 87.0, **wide, gain=-3.0, gain_std=8**0.5),
        row("d", 99.0, **wide, seeds=1, gain=9.0),
    )
    step = race.decide(t, ["a", "b", "c", "d"], seeds=2, max_seeds=5)
    assert step.dropped == {
        "b": "futile: gain +3.00 ± 2.83 (sd) would not be significant even at 5 seeds",
        "c": "futile: gain -3.00 ± 2.83 (sd) would not be significant even at 5 seeds",
    }
    assert step.kept == ("a", "d") and step.leader == "d" and step.next_seeds == 3
    # b led before it was found futile: the lead passes to the best cell still racing.
    without_d = race.decide(t, ["a", "b", "c"], seeds=2, max_seeds=5)
    assert without_d.kept == ("a",) and without_d.leader == "a"
    # At 6 seeds b would clear it (t_{0.975,5} * 2.8284 / sqrt(6) = 2.9682 < 3): it stays.
    assert race.decide(t, ["a", "b", "c"], seeds=2, max_seeds=6).kept == ("a", "b", "c")
    # In the last round there is nothing left to save: no cell is dropped as futile.
    last = race.decide(t, ["a", "b", "c"], seeds=5, max_seeds=5)
    assert last.dropped == {} and last.stop


def test_family_futility_applies_the_tables_correction_to_every_projection():
    # At 5 seeds (t-test, 4 df): a's gains +2 +- 1.4142 give t = 2 / (1.4142 / sqrt 5) =
    # 3.1623, p 0.034109 (uncorrected it races on: test above); e's +10 +- 2 give t = 11.180,
    # p 0.00036435; d ran one seed (nothing known: enters at p 0, never futile); f left the race
    # earlier and keeps its p_seed 0.9. Holm over those 4: d 0, e 3 x 0.00036435 = 0.0010930,
    # a 2 x 0.034109 = 0.068219 >= 0.05: a is futile; f is not racing, so not dropped here.
    wide = {"low": 60.0, "high": 120.0}
    t = table(
        BASE,
        row("a", 92.0, **wide, gain=2.0, gain_std=2**0.5),
        row("e", 100.0, **wide, gain=10.0, gain_std=2.0),
        row("d", 99.0, **wide, seeds=1, gain=9.0),
        row("f", 90.5, **wide, gain=0.5, gain_std=5.0, p_raw=0.9),
    )
    step = race.decide(t, ["a", "e", "d"], seeds=2, max_seeds=5, futility="family")
    assert step.dropped == {
        "a": "futile: gain +2.00 ± 1.41 (sd) would reach p 0.0341 at 5 seeds, holm-adjusted "
        "0.0682 over the table's 4 cells"
    }
    assert step.kept == ("e", "d")
    assert race.decide(t, ["a", "e", "d"], seeds=2, max_seeds=5).dropped == {}
    # Benjamini-Hochberg instead (the table's attrs say which): a's 4/3 x 0.034109 = 0.045479
    # < 0.05, so under the false discovery rate a races on.
    t.attrs["correction"] = "bh"
    assert race.decide(t, ["a", "e", "d"], seeds=2, max_seeds=5, futility="family").dropped == {}
    with pytest.raises(ValueError, match="futility 'holm'"):
        race.decide(t, ["a"], seeds=2, max_seeds=5, futility="holm")


def test_friedman_needs_three_rankable_cells_and_two_common_seeds():
    # b ran one seed, base and a two: b is left out of the ranking, and two cells are too few.
    t = table(
        row("base", 4.0, 1.0, 7.0, baseline=True, by_seed=[5.0, 3.0]),
        row("a", 9.0, 1.0, 17.0, by_seed=[10.0, 8.0]),
        row("b", 1.0, NAN, NAN, seeds=1, by_seed=[1.0]),
    )
    names, seeds, values = race.ranked_seeds(t, ["base", "a", "b"])
    assert (names, seeds, values.tolist()) == (["base", "a"], ["0", "1"], [[5.0, 3.0], [10.0, 8.0]])
    step = race.decide(t, ["a", "b"], seeds=2, max_seeds=5)
    assert step.dropped == {} and step.ranking is None


def test_open_cells_are_kept_and_get_one_more_seed():
    t = table(BASE, row("a", 93.0, 86.0, 100.0), row("b", 91.0, 84.0, 98.0))
    step = race.decide(t, ["a", "b"], seeds=2, max_seeds=5)
    assert step.kept == ("a", "b") and step.dropped == {}
    assert (step.stop, step.next_seeds, step.leader) == (False, 3, "a")


def test_one_seed_gives_no_interval_so_nothing_is_dropped_on_intervals():
    t = table(row("base", 90.0, NAN, NAN, baseline=True, seeds=1), row("a", 99.0, NAN, NAN,
              seeds=1), row("b", 10.0, NAN, NAN, seeds=1))  # fmt: skip
    step = race.decide(t, ["a", "b"], seeds=1, max_seeds=3)
    assert step.kept == ("a", "b") and not step.stop and step.next_seeds == 2


def test_baseline_is_never_dropped_and_can_lead():
    # The baseline leads; a's interval lies below the baseline's (open: it may turn worse, so
    # it races on), b overlaps it.
    t = table(BASE, row("a", 80.0, 75.0, 85.0), row("b", 89.0, 86.0, 92.0))
    step = race.decide(t, ["base", "a", "b"], seeds=2, max_seeds=5)
    assert step.leader == "base"
    assert "base" not in step.kept and "base" not in step.dropped
    assert step.dropped == {} and step.kept == ("a", "b")
    # The baseline runs every seed the kept cells run, also when it is far behind a leader.
    far = table(row("base", 50.0, 49.0, 51.0, baseline=True), row("a", 95.0, 94.0, 96.0),
                row("b", 94.5, 93.0, 96.0))  # fmt: skip
    step = race.decide(far, ["a", "b"], seeds=2, max_seeds=5)
    assert step.kept == ("a", "b")
    assert [t for t in race.round_plan("base", step.kept, 3) if t[0] == "base"] == [
        ("base", 0), ("base", 1), ("base", 2)
    ]  # fmt: skip


def test_stops_at_max_seeds_with_cells_still_open():
    t = table(BASE, row("a", 93.0, 86.0, 100.0), row("b", 91.0, 84.0, 98.0))
    step = race.decide(t, ["a", "b"], seeds=5, max_seeds=5)
    assert step.stop and step.next_seeds == 5 and step.kept == ("a", "b")
    assert step.reason == "reached --max-seeds 5 with 2 cell(s) still open"


def test_stops_when_settled_and_names_the_winner():
    # a and b are better than the baseline and b's interval lies below a's: only a is left.
    t = table(BASE, row("a", 99.0, 97.0, 101.0, "better", gain=9.0, p=0.01),
              row("b", 93.0, 90.0, 96.0, "better", gain=3.0, p=0.02))  # fmt: skip
    step = race.decide(t, ["a", "b"], seeds=3, max_seeds=5)
    assert step.stop and step.kept == ("a",) and step.next_seeds == 3
    assert step.reason == "settled: only the leader a is left, verdict better"
    verdict = race.verdict_of(t, step.kept)
    assert verdict == race.RaceVerdict("a", "a", ("a", "b"), ())
    # Over every cell (the full grid's view) a is still the winner: 97 > b's 96.
    assert race.verdict_of(t, ["a", "b"]).winner == "a"


def test_settled_when_every_cell_is_dropped_below_the_baseline():
    # w is worse; v's gains (-20 +- 30 over 2 seeds) would not be significant at 5 seeds
    # (1.2416 * 30 = 37.2 >= 20): futile.
    t = table(BASE, row("w", 60.0, 55.0, 65.0, "worse", p=0.001),
              row("v", 70, 66, 74, gain=-20.0, gain_std=30.0))  # fmt: skip
    step = race.decide(t, ["w", "v"], seeds=2, max_seeds=5)
    assert step.stop and step.kept == () and step.leader == "base"
    assert step.reason == "settled: no cell is left but the baseline"
    assert race.verdict_of(t, step.kept) == race.RaceVerdict(None, "base", (), ("w",))


def test_lone_leader_still_open_against_the_baseline_races_on():
    t = table(BASE, row("a", 95.0, 89.0, 101.0), row("b", 80.0, 78.0, 82.0, "worse", p=0.01))
    step = race.decide(t, ["a", "b"], seeds=2, max_seeds=5)
    assert step.kept == ("a",) and not step.stop and step.next_seeds == 3
    assert step.reason == "the leader a is not yet told apart from the baseline"


def test_no_winner_without_separation_from_every_rival():
    t = table(BASE, row("a", 99.0, 96.0, 102.0, "better"), row("b", 97.0, 95.0, 99.0, "better"),
              row("w", 80.0, 70.0, 100.0, "worse"))  # fmt: skip
    verdict = race.verdict_of(t, ["a", "b", "w"])
    assert verdict.winner is None and verdict.leader == "a"
    assert (verdict.better, verdict.worse) == (("a", "b"), ("w",))
    # Without b, a wins: w (worse than a baseline a beats) is no rival.
    assert race.verdict_of(t, ["a", "w"]).winner == "a"


def test_a_better_cell_the_leader_beats_seed_for_seed_leaves_though_intervals_overlap():
    # a - b per seed: 2, 2.5, 2 -> mean 13/6, sd 0.288675, t = 13.0 on 2 df, two-sided
    # p = 1 - 13 / sqrt(171) = 0.005865; Holm over the two better rivals: 0.01173. The
    # interval mean +- T2 * sd / sqrt(3) = 2.1667 +- 0.7171. a - c per seed: -1, 3, -1: not
    # significant. Unpaired, b's high 10.73 is above a's low 8.52: only the pairing tells.
    a = row("a", 11.0, 11 - T2 / math.sqrt(3), 11 + T2 / math.sqrt(3), "better", seeds=3,
            by_seed=[10.0, 12.0, 11.0])  # fmt: skip
    b = row("b", 8.8333, 7.0, 10.73, "better", seeds=3, by_seed=[8.0, 9.5, 9.0])
    c = row("c", 10.6667, 7.0, 14.0, "better", seeds=3, by_seed=[11.0, 9.0, 12.0])
    base = row("base", 5.0, 2.5, 7.5, baseline=True, seeds=3, by_seed=[5.0, 6.0, 4.0])
    t = table(base, a, b, c)
    assert 1 - 13 / math.sqrt(171) == pytest.approx(0.005865, abs=1e-6)
    why = "the leader a is ahead by +2.17 [+1.45, +2.88] paired over 3 seeds (Holm-adjusted p 0.0117 over 2)"  # noqa: E501
    assert race.behind_leader(t, "a", ["b", "c"]) == {"b": why}
    step = race.decide(t, ["a", "b", "c"], seeds=3, max_seeds=5)
    assert step.dropped == {"b": f"better, and {why}"}
    assert step.kept == ("a", "c") and step.leader == "a" and not step.stop
    # The winner needs every rival told apart: b is (seed for seed), c is not.
    assert race.verdict_of(t, ["a", "b"]).winner == "a"
    assert race.verdict_of(t, ["a", "b", "c"]).winner is None
    # An open cell is never dropped for being behind: it may still turn better or worse.
    t_open = table(base, a, {**b, "verdict": "open"}, c)
    assert race.decide(t_open, ["a", "b", "c"], seeds=3, max_seeds=5).dropped == {}


# ------------------------------------------------------------------------------ the ledger
def grid_runs(values: dict[str, list[float]], baseline: str = "base", status=None, first=0):
    """A runs_frame-shaped grid: one FINISHED run per (pair set, seed) with that rsum, seeds
    counting up from ``first``."""
    keys = {baseline: "intra_ts:infonce", "a": "intra_ts:infonce,intra_ts:sd",
            "b": "intra_ts:infonce,inter_ss:kl", "c": "intra_ts:infonce,intra_ss:sd"}  # fmt: skip
    rows = []
    for name, series in values.items():
        for seed, value in enumerate(series, first):
            rows.append({
                "run_id": f"{name}-{seed}", "status": "FINISHED",
                "params.pair_set": name, "params.pairs": keys[name], "params.seed": str(seed),
                "params.steps": "10",
                "tags.conaclip.status": (status or {}).get((name, seed), "FINISHED"),
                "tags.conaclip.baseline": str(name == baseline).lower(),
                "metrics.rsum": float(value),
            })  # fmt: skip
    return pd.DataFrame(rows)


def test_finished_trials_reads_the_status_tag_and_visible_runs_the_limits():
    runs = grid_runs({"base": [1, 2, 3], "a": [4, 5, 6]}, status={("a", 1): "FAILED"})
    assert race.finished_trials(runs) == {("base", 0), ("base", 1), ("base", 2), ("a", 0),
                                          ("a", 2)}  # fmt: skip
    visible = race.visible_runs(runs, {"base": 2, "a": 1})
    assert list(visible["run_id"]) == ["base-0", "base-1", "a-0"]
    assert race.finished_trials(pd.DataFrame(columns=["run_id", "status"])) == set()


def test_check_ledger_refuses_runs_made_with_other_settings():
    runs = grid_runs({"base": [1], "a": [2]})
    keys = {"base": "intra_ts:infonce", "a": "intra_ts:infonce,intra_ts:sd"}
    race.check_ledger(runs, keys, steps=10)
    with pytest.raises(
        InputError,
        match=r"run a-0 \(a seed 0\) has pairs intra_ts:infonce,intra_ts:sd and 10 steps",
    ):
        race.check_ledger(runs, {**keys, "a": "intra_ts:infonce,inter_ss:kl"}, steps=10)
    with pytest.raises(InputError, match="this race intra_ts:infonce and 20"):
        race.check_ledger(runs, keys, steps=20)


GRID = {"base": [90, 91, 92], "a": [95, 96, 97], "b": [80, 81, 82], "c": [93, 97, 90]}


def test_replayed_race_sees_only_what_it_asked_for():
    # Round 1 (seeds 0,1; half-width T1 * 0.7071 / 1.4142 = T1 / 2 = 6.3531 at sd 0.7071):
    # a 95.5 (89.1469..101.8531) leads; b 80.5 (..86.8531) lies below a's interval but is
    # open (no bootstrap ranks, so no verdict): it races on. c 95 +- T1 * 2 = 69.5876..120.4124
    # overlaps a, and its paired gains 3 and 6 (+4.5 +- 2.1213) are futile: at 3 seeds
    # t_{0.975,2} * 2.1213 / sqrt(3) = 5.2696 >= 4.5. a's gains (5, 5) and b's (-10, -10) have
    # no spread: they would be significant. Round 2 (seeds 0..2) is base, a and b.
    lines: list[str] = []
    runs = grid_runs(GRID)
    result = race.race_loop("base", ["a", "b", "c"], 2, 3, lambda: runs, None, steps=10,
                            say=lines.append)  # fmt: skip
    first, second = result.rounds
    assert first.step.dropped == {
        "c": "futile: gain +4.50 ± 2.12 (sd) would not be significant even at 3 seeds",
    }
    assert first.step.kept == ("a", "b") and first.launched == []
    assert second.seeds == 3 and second.step.stop and second.step.kept == ("a", "b")
    assert second.planned == race.round_plan("base", ["a", "b"], 3)
    assert second.step.reason == "reached --max-seeds 3 with 2 cell(s) still open"
    # 4 cells x 2 seeds, then seed 2 of base, a and b: 11 of the 12 trials, c's seed 2 unseen.
    assert len(result.asked) == 11 and ("c", 2) not in result.asked
    assert (result.spent_steps, result.full_steps) == (110, 120)
    assert result.verdict == race.RaceVerdict(None, "a", (), ())  # no bootstrap: all open
    assert lines[0] == (
        "race round 1: 8 trials (all already in MLflow), seeds 0..1 per cell; active (2/3): "
        "a, b; dropped: c (futile: gain +4.50 ± 2.12 (sd) would not be significant even at 3 "
        "seeds); leader a; 1 cell(s) not yet told apart from the leader a; F-Race: Friedman p "
        "0.145 over 4 cells x seeds 0..1: not significant, nothing dropped on ranks"
    )
    # Ranks per seed: seed 0 b 1, base 2, c 3, a 4; seed 1 b 1, base 2, a 3, c 4. R = a 7,
    # c 7, base 4, b 2; A = 60, C = 2*4*25/4 = 50, T = 3 * (118 - 100) / 10 = 5.4, whose
    # chi-square (3 df) tail is 0.145.
    assert race.verdict_lines(result)[0] == (
        "race verdict (rsum, 2 round(s), up to 3 seeds): winner none (the leader a is not yet "
        "better than the baseline); better: -; worse: -"
    )
    assert race.verdict_lines(result)[1] == (
        "race spent 11 trials = 110 trial-steps vs 120 for the full grid (4 pair sets x 3 "
        "seeds): 92%"
    )


def test_a_race_from_a_first_seed_reads_only_its_own_seeds():
    # Two draws of the same grid in one experiment: seeds 0..2 as GRID, seeds 3..5 with every
    # value 10 lower for a and 30 higher for b. A race from seed 3 sees only the second draw,
    # so it races exactly as on GRID's gains shifted (c again futile after round 1).
    second = {"base": GRID["base"], "a": [v - 10 for v in GRID["a"]],
              "b": [v + 30 for v in GRID["b"]], "c": GRID["c"]}  # fmt: skip
    runs = pd.concat([grid_runs(GRID), grid_runs(second, first=3)], ignore_index=True)
    visible = race.visible_runs(runs, {"base": 2, "a": 1}, first_seed=3)
    assert list(visible["run_id"]) == ["base-3", "base-4", "a-3"]
    assert race.round_plan("base", ["a"], 2, 3) == [("base", 3), ("a", 3), ("base", 4), ("a", 4)]
    lines: list[str] = []
    result = race.race_loop("base", ["a", "b", "c"], 2, 3, lambda: runs, None, steps=10,
                            say=lines.append, first_seed=3)  # fmt: skip
    assert {seed for _, seed in result.asked} == {3, 4, 5}
    assert len(result.asked) == 11 and ("c", 5) not in result.asked
    assert result.rounds[0].step.dropped == {
        "c": "futile: gain +4.50 ± 2.12 (sd) would not be significant even at 3 seeds",
    }
    # On seeds 3, 4 b (110.5) leads a (85.5): on GRID's seeds a leads, so seeds 0..2 never
    # entered a decision.
    assert result.rounds[0].step.leader == "b" and result.rounds[1].step.leader == "b"
    assert lines[0].startswith("race round 1: 8 trials (all already in MLflow), seeds 3..4 ")
    assert lines[1].startswith("race round 2: 9 trials (all already in MLflow), seeds 3..5 ")
    with pytest.raises(InputError, match="no FINISHED run of base seed 6"):
        race.race_loop("base", ["a"], 2, 3, lambda: runs, None, say=lambda _: None, first_seed=4)


def test_race_loop_launches_only_what_the_ledger_lacks():
    ledger = grid_runs({"base": [90, 91], "a": [95, 96], "b": [80, 81], "c": [93, 97]})
    full = grid_runs(GRID)
    calls: list[tuple[int, list]] = []

    def launch(number, trials):
        calls.append((number, trials))
        nonlocal ledger
        ledger = full  # the launched trials now have their runs
        return []

    result = race.race_loop("base", ["a", "b", "c"], 2, 3, lambda: ledger, launch,
                            say=lambda _: None)  # fmt: skip
    # Round 1 dropped c (futile; see the test above): round 2 runs base, a and b.
    assert calls == [(2, [("base", 2), ("a", 2), ("b", 2)])]
    assert result.rounds[0].launched == [] and result.rounds[1].launched == calls[0][1]


def test_race_loop_stops_undecided_when_a_round_is_interrupted():
    from orchestrator.ablation import TrialOutcome

    ledger = grid_runs({"base": [90, 91], "a": [95, 96], "b": [80, 81], "c": [93, 97]})
    said: list[str] = []
    calls: list[int] = []

    def launch(number, trials):  # Ctrl-C during the round: Tune stopped every trial
        calls.append(number)
        return [TrialOutcome(name, seed, race.INTERRUPTED, "", None) for name, seed in trials]

    result = race.race_loop("base", ["a", "b", "c"], 2, 3, lambda: ledger, launch,
                            say=said.append)  # fmt: skip
    # Round 1 is decided from the ledger (c dropped); round 2's three trials were cut short,
    # so nothing after it runs and no verdict is drawn from seeds that happened to finish.
    assert calls == [2] and len(result.rounds) == 1
    assert result.interrupted and result.verdict is None
    assert said[-1] == (
        "race round 2: interrupted with 3 of its 3 trials unfinished; no cell is decided on a "
        "partial round"
    )
    assert result.as_dict()["interrupted"] is True


def test_replay_needs_every_run_the_race_asks_for():
    runs = grid_runs({"base": [90, 91, 92], "a": [95, 96], "b": [80, 81, 82], "c": [93, 97, 90]})
    with pytest.raises(InputError, match="no FINISHED run of a seed 2: not a full grid"):
        race.race_loop("base", ["a", "b", "c"], 2, 3, lambda: runs, None, say=lambda _: None)


def test_replay_of_a_race_ledger_reports_the_race_alone(benchmark_script):
    # An earlier race's ledger, not a grid: c was dropped after round 1 (futile, see above), so
    # its seed 2 never ran. The same race replays on it; there is no grid verdict to compare.
    runs = grid_runs(GRID)
    runs = runs[runs["run_id"] != "c-2"].reset_index(drop=True)
    lines: list[str] = []
    bench = benchmark_script("race_replay")
    report = bench.replay(runs, 2, 3, say=lines.append)
    assert lines[0] == ("race_replay: not a full grid at 3 seeds: no FINISHED run of c seed 2; "
                        "the race is replayed alone")  # fmt: skip
    assert (report["trials"], report["spent_steps"], report["full_steps"]) == (11, 110, 120)
    assert report["grid_verdict"] is None and report["same"] is None
    assert report["fewest_trials"] is None and report["futility"] == "uncorrected"
    assert bench.markdown_row(report) == (
        "| None | 2..3 | 11 | 110 | 120 | 92% | - | - | - | - | - | - |"
    )


def test_replay_of_a_grid_whose_seeds_start_above_zero(benchmark_script):
    # The same grid drawn at seeds 7..9 (`ablate --first-seed 7`): the replay races from its
    # smallest seed, so it is the race and floor of GRID at seeds 0..2, seeds renumbered.
    bench = benchmark_script("race_replay")
    report = bench.replay(grid_runs(GRID, first=7), 2, 3, say=lambda _: None)
    at_zero = bench.replay(grid_runs(GRID), 2, 3, say=lambda _: None)
    assert report["first_seed"] == 7 and at_zero["first_seed"] == 0
    assert (report["trials"], report["spent_steps"], report["full_steps"]) == (11, 110, 120)
    assert report["same"] == {"winner": True, "better": True, "worse": True}
    assert report["fewest_trials"] == at_zero["fewest_trials"]
    same_keys = ("seeds", "trials", "kept", "dropped", "leader", "stop", "reason")
    assert [r["first_seed"] for r in report["rounds"]] == [7, 7]
    assert [[r[k] for k in same_keys] for r in report["rounds"]] == [
        [r[k] for k in same_keys] for r in at_zero["rounds"]
    ]
    # F-Race names the seeds it ranked over: the grid's own.
    assert "seeds 7..8" in report["rounds"][0]["ranking"]


def test_replay_benchmark_on_a_real_sqlite_store(tmp_path):
    from orchestrator import tracking

    uri = tracking.default_tracking_uri(tmp_path)
    experiment = tracking.get_or_create_experiment(uri, "grid")
    client = tracking.client(uri)
    for record in grid_runs(GRID).to_dict("records"):
        run = client.create_run(experiment, tags={
            "conaclip.ablation_id": "grid", "conaclip.status": "FINISHED",
            "conaclip.baseline": record["tags.conaclip.baseline"]})  # fmt: skip
        for key in ("pair_set", "pairs", "seed", "steps"):
            client.log_param(run.info.run_id, key, record[f"params.{key}"])
        client.log_metric(run.info.run_id, "rsum", record["metrics.rsum"], step=10)
        client.set_terminated(run.info.run_id, "FINISHED")
    # `conaclip best --verify` adds its recipe's runs to the grid's experiment: not a cell.
    for seed in range(3):
        run = client.create_run(experiment, tags={
            "conaclip.ablation_id": "grid", "conaclip.status": "FINISHED",
            "conaclip.baseline": "false", "conaclip.preset": "verify"})  # fmt: skip
        for key, value in (("pair_set", "combined_recipe"),
                           ("pairs", "intra_ts:infonce,intra_ts:sd,inter_ss:kl"), ("seed", seed),
                           ("steps", 10)):  # fmt: skip
            client.log_param(run.info.run_id, key, value)
        client.log_metric(run.info.run_id, "rsum", 200.0, step=10)
        client.set_terminated(run.info.run_id, "FINISHED")
    out = tmp_path / "replay.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "race_replay.py"), "--tracking-uri", uri,
         "--experiment", "grid", "--start-seeds", "2", "--max-seeds", "3", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    import json

    report = json.loads(out.read_text())
    assert (report["trials"], report["spent_steps"], report["full_steps"]) == (11, 110, 120)
    assert [r["dropped"] for r in report["rounds"]] == [
        {"c": "futile: gain +4.50 ± 2.12 (sd) would not be significant even at 3 seeds"}, {}
    ]  # fmt: skip
    assert report["verdict"] == {"winner": None, "leader": "a", "better": [], "worse": []}
    assert report["grid_verdict"] == report["verdict"]
    assert report["same"] == {"winner": True, "better": True, "worse": True}
    assert done.stdout.splitlines()[-1] == (
        "| grid | 2..3 | 11 | 110 | 120 | 92% | 67% | - | - | yes | yes | yes |"
    )


# ------------------------------------------------------------------------------ the CLI
def test_race_needs_a_baseline_and_max_seeds_at_least_seeds(capsys):
    # No set is the MoTIS baseline (intra_ts:infonce alone), so there is nothing to pair with.
    no_baseline = "intra_ts:infonce,inter_ss:kl;intra_ts:sd"
    assert main(["ablate", "--pairs", no_baseline, "--race", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("conaclip: error: --race: the pair sets")
    code = main(["ablate", "--preset", "smoke", "--race", "--seeds", "3", "--max-seeds", "2",
                 "--dry-run"])  # fmt: skip
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "conaclip: error: --max-seeds 2 is below --seeds 3: every cell starts with --seeds"
    )
    assert main(["ablate", "--preset", "smoke", "--max-seeds", "4", "--dry-run"]) == 2
    assert "only with --race" in capsys.readouterr().err


def test_race_dry_run_shows_round_one(capsys):
    assert main(["ablate", "--preset", "smoke", "--race", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("race: round 1 runs every pair set at seeds 0..1;")
    assert "up to 5 seeds (at most 15 trials = 90 trial-steps)" in out[0]
    assert out[1] == ("6 trials (3 pair sets, explicit trial list), 6 steps each = 36 "
                      "trial-steps (batch 16 x 1 worker(s))")  # fmt: skip
    assert [line.split()[1:4] for line in out[2:]] == [
        [name, "seed", str(seed)] for seed in (0, 1)
        for name in ("baseline", "baseline+intra_ts:sd", "baseline+inter_ts:sym_kl")
    ]  # fmt: skip


def test_first_seed_numbers_the_seeds_of_a_grid_and_of_a_race(capsys):
    assert main(["ablate", "--preset", "smoke", "--seeds", "2", "--first-seed", "5",
                 "--dry-run"]) == 0  # fmt: skip
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("6 trials (3 pair sets x 2 seeds)")
    assert [line.split()[2:4] for line in out[1:]] == [["seed", "5"]] * 3 + [["seed", "6"]] * 3
    assert main(["ablate", "--preset", "smoke", "--race", "--first-seed", "5", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("race: round 1 runs every pair set at seeds 5..6;")
    assert [line.split()[3] for line in out[2:]] == ["5"] * 3 + ["6"] * 3
    assert main(["ablate", "--preset", "smoke", "--first-seed", "-1", "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == (
        "conaclip: error: --first-seed -1: seeds are 0 or more"
    )


def test_help_explains_race_and_max_seeds(capsys):
    with pytest.raises(SystemExit):
        main(["ablate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--race seed racing (needs a baseline)" in text
    assert "--max-seeds MAX_SEEDS --race: no cell runs more seeds than M (default 5" in text


def test_explicit_trial_list_is_what_tune_expands():
    from orchestrator.ablation import AblationSpec, expand_trials
    from trainers.run_config import DistillConfig

    spec = AblationSpec(
        name="x", preset="custom", out_dir="/tmp/x", tracking_uri="sqlite:////tmp/x/m.db",
        pair_sets={"b/ase": [{"pair": "intra_ts:infonce"}],
                   "c": [{"pair": "intra_ts:sd"}]},
        trials=[("c", 3), ("b/ase", 0), ("c", 0)], run=DistillConfig(steps=7),
    )  # fmt: skip
    assert spec.trial_count == 3
    assert [(t["pair_set"], t["seed"]) for t in expand_trials(spec)] == spec.trial_list() == [
        ("c", 3), ("b/ase", 0), ("c", 0)
    ]  # fmt: skip
    with pytest.raises(ValueError, match="trials name pair sets the spec lacks: d"):
        AblationSpec.model_validate({**spec.model_dump(), "trials": [("d", 0)]})


# ------------------------------------------------------------------------------ end to end
@pytest.mark.integration
def test_race_end_to_end_then_resume_launches_nothing(
    tiny_shapes, tiny_teacher, local_ray, tmp_path, capsys
):
    from orchestrator import tracking

    out = tmp_path / "race"
    flags = data_flags(tiny_shapes, tiny_teacher, tmp_path / "home")
    code = main(["ablate", "--preset", "smoke", "--race", "--seeds", "2", "--max-seeds", "3",
                 "--steps", "4", "--eval-every", "2", "--batch-size", "8", "--out", str(out),
                 "--name", "race-e2e", *flags])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    uri = tracking.default_tracking_uri(out)
    runs = tracking.runs_frame(uri, "race-e2e")
    assert set(runs["tags.conaclip.status"]) == {"FINISHED"}
    trials = list(zip(runs["params.pair_set"], runs["params.seed"].astype(int), strict=True))
    assert len(trials) == len(set(trials))  # every (cell, seed) ran once
    seeds_of = {name: {s for n, s in trials if n == name} for name, _ in trials}
    assert seeds_of["baseline"] == set(range(max(map(len, seeds_of.values()))))
    assert all(seeds == set(range(len(seeds))) for seeds in seeds_of.values())
    assert all(2 <= len(seeds) <= 3 for seeds in seeds_of.values())
    assert set(runs["params.steps"]) == {"4"}
    # Round 1 ran seeds 0 and 1 of all three sets; round 2 (if any) only seed 2.
    rounds = dict(zip(trials, runs["tags.conaclip.round"], strict=True))
    assert {t for t, r in rounds.items() if r == "1"} == {
        (n, s) for n in ("baseline", "baseline+intra_ts:sd", "baseline+inter_ts:sym_kl")
        for s in (0, 1)
    }  # fmt: skip
    assert {s for (_, s), r in rounds.items() if r != "1"} <= {2}
    assert set(rounds.values()) <= {"1", "2"}
    round_lines = [line for line in captured.err.splitlines() if line.startswith("race round")]
    assert round_lines[0].startswith("race round 1: 6 trials (6 launched), seeds 0..1 per cell")
    assert len(round_lines) == len(set(rounds.values()))
    assert "race verdict (rsum" in captured.out
    spent = f"race spent {len(trials)} trials = {4 * len(trials)} trial-steps vs 36"
    assert spent in captured.out

    # Again with --resume: every round is replayed from MLflow, no trial is launched.
    tune_runs = sorted(p.name for p in (out / "tune").iterdir() if p.is_dir())
    assert main(["ablate", "--resume", "--out", str(out), "--name", "race-e2e"]) == 0
    again = capsys.readouterr()
    assert len(tracking.runs_frame(uri, "race-e2e")) == len(runs)
    assert sorted(p.name for p in (out / "tune").iterdir() if p.is_dir()) == tune_runs
    replayed = [line for line in again.err.splitlines() if line.startswith("race round")]
    assert len(replayed) == len(round_lines)
    assert all("(all already in MLflow)" in line for line in replayed)
    # The live rounds decided exactly what a replay of their runs decides.
    strip = [line.split(" trials (")[1].split(")", 1)[1] for line in round_lines]
    assert [line.split(" trials (")[1].split(")", 1)[1] for line in replayed] == strip
    assert again.out.splitlines()[-2:] == captured.out.splitlines()[-2:]

    # A trial whose run the ledger holds as FAILED is run again, and only that one: round 1's
    # Tune run is restored (its trials all ended) and the trial runs as round1-retry1.
    failed = runs[(runs["params.pair_set"] == "baseline") & (runs["params.seed"] == "0")]
    client = tracking.client(uri)
    client.set_tag(failed["run_id"].iloc[0], "conaclip.status", "FAILED")
    assert main(["ablate", "--resume", "--out", str(out), "--name", "race-e2e"]) == 0
    third = capsys.readouterr()
    assert "race round 1: 6 trials (1 launched)" in third.err
    assert (out / "tune" / "race-e2e-round1-retry1").is_dir()
    final = tracking.runs_frame(uri, "race-e2e")
    done = final[final["tags.conaclip.status"] == "FINISHED"]
    done_trials = list(zip(done["params.pair_set"], done["params.seed"], strict=True))
    assert len(done_trials) == len(set(done_trials)) >= len(trials)
    assert ("baseline", "0") in done_trials
    new = done[~done["run_id"].isin(runs["run_id"])]
    rerun = new[(new["params.pair_set"] == "baseline") & (new["params.seed"] == "0")]
    assert list(rerun["tags.conaclip.round"]) == ["1"]


def ranked_grid(xs: dict[str, list[int]]):
    """(runs, ranks_of) of a grid whose run (name, seed) has t2i = i2t recalls (x, x+10, x+20)
    for x = ``xs[name][seed]``: rsum 6x + 60, with eval ranks that give exactly it."""
    from test_table import ranks_for

    runs = grid_runs({name: [6 * x + 60 for x in series] for name, series in xs.items()})
    ranks = {f"{name}-{seed}": ranks_for(x, x) for name, series in xs.items()
             for seed, x in enumerate(series)}  # fmt: skip

    def ranks_of(visible):
        return {run_id: ranks[run_id] for run_id in visible["run_id"]}

    return runs, ranks_of


FEWEST_XS = {"base": [20, 20, 20], "a": [25, 27, 26], "b": [10, 10, 10], "c": [22, 18, 21]}


def test_fewest_trials_counts_the_seeds_each_decided_cell_needs(benchmark_script):
    replay = benchmark_script("race_replay")
    runs, ranks_of = ranked_grid(FEWEST_XS)
    # a's gains 30, 42, 36: at 2 seeds t = 36 / (8.485 / sqrt 2) = 6.0, 1 df, p 0.105; at 3
    # seeds t = 36 / (6 / sqrt 3) = 10.39, 2 df, p 0.0091 (Holm x2 = 0.018): better at 3.
    # b's gains -60 at every seed (no spread): p 0 from 2 seeds on, worse. c's 12, -12, 6: open,
    # and at 2 seeds (gain 0) its bootstrap fails, so all three could pass the seed test: the
    # level is Holm's last step, 0.05.
    grid = replay.full_grid_verdict(runs, "base", ["a", "b", "c"], 3, "rsum", ranks_of)
    assert (grid.better, grid.worse) == (("a",), ("b",))
    floor = replay.fewest_trials(runs, "base", ["a", "b", "c"], grid, 2, 3, "rsum", ranks_of)
    # The baseline runs as far as a (3), b stops at 2, c is only in round 1 (2): 10 of 12.
    assert floor["seeds"] == {"base": 3, "a": 3, "b": 2, "c": 2}
    assert (floor["trials"], floor["share"], floor["seed_level"]) == (10, 10 / 12, 0.05)
    # Started at 3 seeds every cell has 3: the whole grid.
    assert replay.fewest_trials(runs, "base", ["a", "b", "c"], grid, 3, 3, "rsum",
                                ranks_of)["trials"] == 12  # fmt: skip
    # The race itself spends those 10: round 1 drops b (worse) and c (futile), round 2 runs
    # base and a. (It names a the winner where the grid does not: c, no longer racing, is not
    # its rival, while at 3 seeds c's interval still reaches a's.)
    report = replay.replay(runs, 2, 3, "rsum", ranks_of, say=lambda _: None)
    assert report["trials"] == 10 and report["fewest_trials"] == floor
    assert report["same"] == {"winner": False, "better": True, "worse": True}


def test_seed_level_is_the_least_strict_raw_p_a_significant_cell_can_have(benchmark_script):
    replay = benchmark_script("race_replay")
    # Holm over 19 cells with at most 10 significant: the 10th step needs p < 0.05 / 10.
    assert replay.seed_level("holm", 0.05, 19, 10) == pytest.approx(0.005)
    assert replay.seed_level("holm", 0.05, 19, 19) == pytest.approx(0.05)  # the last step
    assert replay.seed_level("holm", 0.05, 19, 1) == pytest.approx(0.05 / 19)
    # Benjamini-Hochberg with 10 of 19 significant: p <= p_(10) < 0.05 * 10 / 19.
    assert replay.seed_level("bh", 0.05, 19, 10) == pytest.approx(0.05 * 10 / 19)
    with pytest.raises(ValueError):
        replay.seed_level("holm", 0.05, 19, 0)


def test_fewest_trials_holds_a_decided_cell_to_holms_level_not_the_raw_one(benchmark_script):
    replay = benchmark_script("race_replay")
    # a's gains 30, 42, 24, 36 (x 25, 27, 24, 26): at 3 seeds t = 32 / (9.165 / sqrt 3) = 6.047
    # on 2 df, p = 1 - t / sqrt(t^2 + 2) = 0.0263: below 0.05 but not below Holm's level. b is
    # -60 at every seed (p 0). c swings +84, -36, +90, -42: open on seeds, but its bootstrap
    # over eval queries passes at every count, so it cannot be a third significant cell: at
    # most 2 of 3 are, and a cell needs p < 0.05 / (3 - 2 + 1) = 0.025.
    xs = {"base": [20] * 4, "a": [25, 27, 24, 26], "b": [10] * 4, "c": [34, 14, 35, 13]}
    runs, ranks_of = ranked_grid(xs)

    for n in (2, 3, 4):
        visible = race.visible_runs(runs, {name: n for name in xs}, 0)
        rows = {r["pair_set"]: r for r in race.race_table(visible, "rsum", ranks_of(visible))
                .to_dict("records")}  # fmt: skip
        assert rows["c"]["p_boot"] < 0.05 / 3 and not rows["c"]["p_seed"] < 0.05
        if n == 3:
            assert rows["a"]["p_seed"] == pytest.approx(1 - 6.047 / math.sqrt(6.047**2 + 2),
                                                        abs=1e-4)  # fmt: skip
    grid = replay.full_grid_verdict(runs, "base", ["a", "b", "c"], 4, "rsum", ranks_of)
    assert (grid.better, grid.worse) == (("a",), ("b",))
    floor = replay.fewest_trials(runs, "base", ["a", "b", "c"], grid, 2, 4, "rsum", ranks_of)
    # Raw p alone would stop a at 3 seeds (11 of 16); Holm's level needs its 4th (t 8.52, p
    # 0.0034), and the baseline's.
    assert floor["seed_level"] == pytest.approx(0.025)
    assert floor["seeds"] == {"base": 4, "a": 4, "b": 2, "c": 2}
    assert (floor["trials"], floor["share"]) == (12, 12 / 16)
    # From 1 seed a cell dropped at once leaves the seed family: the level falls back to 0.05.
    from_one = replay.fewest_trials(runs, "base", ["a", "b", "c"], grid, 1, 4, "rsum", ranks_of)
    assert from_one["seed_level"] == 0.05
    assert from_one["seeds"] == {"base": 3, "a": 3, "b": 2, "c": 1}
