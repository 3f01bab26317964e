"""The arithmetic on ablation-scale run records (``orchestrator.asha_replay``,
``orchestrator.run_timing``), on records as ``benchmarks/ablation_scale.py run`` writes them."""

from __future__ import annotations

import pytest

from orchestrator.asha_replay import (
    asha_replay_rows,
    asha_rungs,
    asha_vs_grid,
    halving_step_share,
    replay_asha,
    report_ranks,
)
from orchestrator.run_timing import seed_prefix_walls


def test_seed_prefix_walls_is_the_last_end_among_the_first_seeds():
    # Seed 0's trials end at +50 and +70 s, seed 1's at +65 (overlapping seed 0's tail) and
    # +120, seed 2's at +160: one seed took 70 s, two 120 s; three are the whole run, left out.
    t0 = 1_000.0
    trials = [{"seed": s, "ended_at": t0 + e} for s, e in ((0, 50), (0, 70), (1, 65), (1, 120),
                                                           (2, 160))]  # fmt: skip
    result = {"timings": {"started_at": t0}, "trials": trials}
    assert seed_prefix_walls(result) == {1: 70.0, 2: 120.0}


def test_seed_prefix_walls_is_empty_for_results_without_timestamps():
    assert seed_prefix_walls({"timings": {}, "trials": [{"seed": 0}]}) == {}
    old = {"timings": {"started_at": 0.0}, "trials": [{"seed": 0, "ended_at": None}]}
    assert seed_prefix_walls(old) == {}


def _trial(pair_set: str, seed: int, step: int, rsum: float) -> dict:
    return {"pair_set": pair_set, "seed": seed, "step": step, "rsum": rsum}


def test_asha_vs_grid_compares_each_seed_with_the_same_seed_of_the_grid():
    # Grid, seed 0: a 90 > b 80 > c 70; seed 1: c 95 > a 85 > b 60 (150 steps each).
    grid = {"trials": [_trial("a", 0, 150, 90.0), _trial("b", 0, 150, 80.0),
                       _trial("c", 0, 150, 70.0), _trial("a", 1, 150, 85.0),
                       _trial("b", 1, 150, 60.0), _trial("c", 1, 150, 95.0)]}  # fmt: skip
    # ASHA on seed 0 stopped a (the grid's top) at step 60, ran b and c to the end; b's
    # rsum there is 0.5 off the grid's, c's equal.
    asha = {"grace_period": 2,
            "trials": [_trial("a", 0, 60, 40.0), _trial("b", 0, 150, 80.5),
                       _trial("c", 0, 150, 70.0)]}  # fmt: skip
    [row] = asha_vs_grid(grid, asha)
    assert row["seed"] == 0 and row["grace_period"] == 2
    assert (row["asha_steps"], row["grid_steps"]) == (360, 450)
    assert row["share"] == 0.8 and row["ran_to_end"] == 2
    assert (row["grid_top"], row["asha_top"], row["same_top"]) == ("a", "b", False)
    # ASHA's pick is the grid's 2nd, 10 rsum behind the grid's top (the grid's values).
    assert (row["asha_top_grid_rank"], row["gap"], row["asha_top_rsum"]) == (2, 10.0, 80.0)
    assert row["grid_top_stopped_at"] == 60 and row["max_rsum_diff"] == 0.5


def test_asha_vs_grid_names_a_seed_the_grid_lacks():
    grid = {"ablation": "sa", "trials": [_trial("a", 0, 150, 90.0)]}
    asha = {"trials": [_trial("a", 3, 150, 90.0)]}
    with pytest.raises(ValueError, match="sa: no trials of seed 3"):
        asha_vs_grid(grid, asha)


def test_asha_rungs_follow_tunes_bracket():
    # max_t 5, reduction 2: grace 1 -> rungs 1, 2, 4; grace 2 -> 2, 4; grace 3 -> 3 alone.
    assert asha_rungs(5, 1) == [1, 2, 4]
    assert asha_rungs(5, 2) == [2, 4]
    assert asha_rungs(5, 3) == [3]
    assert asha_rungs(9, 1, rf=3) == [1, 3, 9]


def test_halving_step_share_by_hand():
    # grace 1 of 5 reports: 1 report for all, then 1/2 for 1, 1/4 for 2, 1/8 for 1:
    # (1 + 0.5 + 0.5 + 0.125) / 5 = 0.425.
    assert abs(halving_step_share(5, 1) - 0.425) < 1e-12
    # grace 2: 2 + 0.5 * 2 + 0.25 * 1 = 3.25 of 5; grace 3: 3 + 0.5 * 2 = 4 of 5.
    assert abs(halving_step_share(5, 2) - 0.65) < 1e-12
    assert abs(halving_step_share(5, 3) - 0.8) < 1e-12
    # a rung at the last report stops nothing after it: everyone runs all 5.
    assert halving_step_share(5, 5) == 1.0


def _curved(pair_set: str, rsums: list[float], index: int) -> dict:
    curve = [[10 * (k + 1), r] for k, r in enumerate(rsums)]
    return {"trial_id": f"x_{index:05d}", "pair_set": pair_set, "seed": 0,
            "step": curve[-1][0], "rsum": curve[-1][1], "curve": curve}  # fmt: skip


# Four trials, three reports each (every 10 steps), in launch order; final rsums a 30, b 40,
# c 50, d 35.
CURVES = [("a", [10, 20, 30]), ("b", [5, 25, 40]), ("c", [15, 18, 50]), ("d", [12, 30, 35])]


def test_replay_asha_feeds_tunes_scheduler_in_launch_order():
    trials = [_curved(name, rsums, i) for i, (name, rsums) in enumerate(CURVES)]
    # max_t 3, grace 1, reduction 2: rungs at reports 1 and 2, each against the median of
    # what reached the rung before. One at a time: a passes both (nothing recorded yet);
    # b at report 1: 5 < 10, stopped at step 10; c at report 1: 15 >= median(10, 5) = 7.5,
    # at report 2: 18 < 20, stopped at step 20; d: 12 >= median(10, 5, 15) = 10, then
    # 30 >= median(20, 18) = 19, runs to the end.
    stops = replay_asha(trials, 1, 2, eval_every=10, concurrency=1, startup_steps=0)
    assert stops == {"a": 30, "b": 10, "c": 20, "d": 30}
    # Two at a time the reports arrive in another order, with the same decisions here.
    assert replay_asha(trials, 1, 2, eval_every=10, concurrency=2) == stops
    # Grace 2: one rung, at report 2: a 20 on; b 25 >= 20 on; c 18 < median(20, 25) stops;
    # d 30 >= median(20, 25, 18) = 20 on.
    assert replay_asha(trials, 2, 2, eval_every=10, concurrency=1) == {
        "a": 30, "b": 30, "c": 20, "d": 30}  # fmt: skip

    grid = {"args": {"eval_every": 10}, "trials": trials}
    [row] = asha_replay_rows(grid, [1], [2], concurrency=1, startup_steps=0)
    # 30 + 10 + 20 + 30 = 90 of 120 trial-steps; ASHA's pick d (35) is the grid's 3rd, 15 rsum
    # behind its top c (50), which ASHA stopped at step 20.
    assert (row["asha_steps"], row["grid_steps"], row["share"]) == (90, 120, 0.75)
    assert (row["asha_top"], row["grid_top"], row["asha_top_grid_rank"]) == ("d", "c", 3)
    assert (row["gap"], row["grid_top_stopped_at"], row["reduction_factor"]) == (15, 20, 2)
    assert row["max_rsum_diff"] == 0


def test_report_ranks_by_hand():
    grid = {"trials": [_curved(name, rsums, i) for i, (name, rsums) in enumerate(CURVES)]}
    rows = report_ranks(grid)
    # Final top-1 is c. At step 10 (10, 5, 15, 12) vs the end (30, 40, 50, 35): pairs ab and
    # bd discordant, 4 of 6 concordant, tau 1/3, c first; at step 20 (20, 25, 18, 30): 2
    # concordant (ab, ad), tau -1/3, c last of 4; at the end tau 1.
    assert [(r["step"], r["top_rank"]) for r in rows] == [(10, 1), (20, 4), (30, 1)]
    assert [round(r["tau"], 6) for r in rows] == [round(1 / 3, 6), round(-1 / 3, 6), 1.0]
