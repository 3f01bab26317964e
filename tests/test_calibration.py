"""Calibration with known truth: simulated grids with both noises, correlated cells (one
baseline per seed) and a shared eval-set effect, decided by the table's own functions
(``orchestrator.verdict_simulation``). The family-wise error of the fixed grid and of the race
stays at or below 0.05; power grows with seeds. The long run (many replicates, the 19 cells of
``single_additions``) is marked slow."""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import pytest

from orchestrator.sequential import Design
from orchestrator.verdict_simulation import Scenario, is_false, simulate
from orchestrator.verdicts import BETTER, EQUIVALENT, OPEN, WORSE


def test_false_decisions_by_definition():
    assert is_false(0.0, BETTER, 6) and is_false(0.0, WORSE, 6)
    assert is_false(-2.0, BETTER, 6) and not is_false(2.0, BETTER, 6)
    assert is_false(6.0, EQUIVALENT, 6) and not is_false(5.9, EQUIVALENT, 6)
    assert not is_false(0.0, OPEN, 6) and not is_false(0.0, EQUIVALENT, 6)


def test_null_cells_fixed_and_raced_keep_the_error_rate():
    scenario = Scenario((0.0,) * 8, seed_sd=2.0, eval_sd=0.6, eval_seed_sd=0.5)
    fixed, raced = simulate(scenario, Design.race(2, 6), replicates=150, seed=1)
    assert fixed.replicates == raced.replicates == 150
    assert fixed.fwer_rate <= 0.05 and raced.fwer_rate <= 0.05
    # Null cells do get decided: equivalent, and the race stops them early.
    assert raced.decided_rate(0) > 0.5
    assert raced.trials < fixed.trials


def test_power_grows_with_seeds():
    scenario = Scenario((8.0, -8.0, 0.0, 0.0), seed_sd=3.0, eval_sd=0.8, eval_seed_sd=0.5)
    rates = []
    for n in (3, 5, 8):
        fixed, _ = simulate(scenario, Design((n,)), replicates=60, seed=2)
        rates.append(fixed.correct_by(n))
        assert fixed.fwer_rate <= 0.05
    assert rates[0] < rates[1] < rates[2]


def _fwer_rates(job: tuple[Scenario, Design, int, int]) -> tuple[float, float]:
    scenario, design, replicates, seed = job
    fixed, raced = simulate(scenario, design, replicates=replicates, seed=seed)
    return fixed.fwer_rate, raced.fwer_rate


@pytest.mark.slow
@pytest.mark.parametrize("spending", ["obf", "pocock"])
def test_single_additions_sized_family_keeps_the_error_rate(spending):
    # 19 cells as single_additions has: nulls, real gains and losses, and cells exactly at
    # the margin (for which "equivalent" is false). Noise at the levels the built-in data
    # shows (docs/results/noise_budget.json).
    effects = (0.0,) * 9 + (5.0, 5.0, 8.0, -5.0, -8.0) + (6.0, -6.0, 6.0, 3.0, -3.0)
    scenario = Scenario(effects, seed_sd=3.2, eval_sd=1.3, eval_seed_sd=1.0, margin=6.0)
    # Cells whose training noise differs (a lognormal spread of sds, as real cells show), at
    # the noise of the built-in data's five-fold eval.
    uneven = Scenario(effects, seed_sd=3.1, eval_sd=0.45, eval_seed_sd=1.0, seed_sd_spread=0.5)
    nulls = Scenario((0.0,) * 19, seed_sd=3.2, eval_sd=1.3, eval_seed_sd=1.0, margin=6.0)
    design = Design.race(2, 8, spending)
    jobs = [(scenario, design, 600, 3), (uneven, design, 600, 5), (nulls, design, 600, 4)]
    # Independent simulations with their own seeds: run side by side on the machine's cores
    # (the same draws, so the same rates, as one after the other).
    workers = min(len(jobs), os.cpu_count() or 1)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        rates = dict(zip(("effects", "uneven", "nulls"), pool.map(_fwer_rates, jobs), strict=True))
    for name, (fixed, raced) in rates.items():
        assert fixed <= 0.05 and raced <= 0.05, (name, fixed, raced)
