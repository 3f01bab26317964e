"""benchmarks/ablation_scale.py's arithmetic on a result as its ``run`` writes it."""

from __future__ import annotations


def test_seed_prefix_walls_is_the_last_end_among_the_first_seeds(benchmark_script):
    # Seed 0's trials end at +50 and +70 s, seed 1's at +65 (overlapping seed 0's tail) and
    # +120, seed 2's at +160: one seed took 70 s, two 120 s; three are the whole run, left out.
    t0 = 1_000.0
    trials = [{"seed": s, "ended_at": t0 + e} for s, e in ((0, 50), (0, 70), (1, 65), (1, 120),
                                                           (2, 160))]  # fmt: skip
    result = {"timings": {"started_at": t0}, "trials": trials}
    assert benchmark_script("ablation_scale").seed_prefix_walls(result) == {1: 70.0, 2: 120.0}


def test_seed_prefix_walls_is_empty_for_results_without_timestamps(benchmark_script):
    bench = benchmark_script("ablation_scale")
    assert bench.seed_prefix_walls({"timings": {}, "trials": [{"seed": 0}]}) == {}
    old = {"timings": {"started_at": 0.0}, "trials": [{"seed": 0, "ended_at": None}]}
    assert bench.seed_prefix_walls(old) == {}
