"""orchestrator.gain_test on hand-made numbers: the shared eval-set variance by hand, the test
against scipy's t-test where the eval set adds nothing, the normal test where seeds add nothing,
and Weerahandi's generalized p-value against an independent numerical integration."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate
from scipy import stats as scipy_stats

from orchestrator.gain_test import paired_gain_test, shared_eval_variance


def test_shared_eval_variance_is_the_mean_cross_seed_covariance_by_hand():
    # Two seeds, three resamples. Seed 0: 1, 2, 3 (mean 2); seed 1: 2, 2, 5 (mean 3).
    # cov = ((1-2)(2-3) + (2-2)(2-3) + (3-2)(5-3)) / 2 = (1 + 0 + 2) / 2 = 1.5
    boot = np.array([[1.0, 2.0, 3.0], [2.0, 2.0, 5.0]])
    assert shared_eval_variance(boot) == pytest.approx(1.5)
    # Three seeds: the mean of the six off-diagonal covariances.
    rng = np.random.default_rng(0)
    boot = rng.normal(size=(3, 50))
    cov = np.cov(boot, ddof=1)
    off = cov[~np.eye(3, dtype=bool)].mean()
    assert shared_eval_variance(boot) == pytest.approx(max(off, 0.0))
    # Negative covariance is clipped at 0 (a variance); one seed gives its own variance.
    assert shared_eval_variance(np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])) == 0.0
    assert shared_eval_variance(np.array([[1.0, 2.0, 3.0]])) == pytest.approx(1.0)


@pytest.mark.parametrize("gains", [[1.0, 2.0, 3.0], [4.1, -0.3, 2.2, 5.0], [0.5, 0.9]])
def test_without_eval_noise_it_is_the_paired_t_test(gains):
    g = np.array(gains)
    boot = np.repeat(g[:, None], 20, axis=1)  # every resample scores the same: C = 0
    test = paired_gain_test(g, boot)
    assert test.eval_var == 0.0
    assert test.seed_var == pytest.approx(g.var(ddof=1) / g.size)
    assert test.p_diff == pytest.approx(scipy_stats.ttest_1samp(g, 0).pvalue, rel=1e-4)
    se = scipy_stats.sem(g)
    low, high = scipy_stats.t.interval(0.95, g.size - 1, loc=g.mean(), scale=se)
    assert test.interval() == pytest.approx((low, high), rel=1e-5)
    # TOST at margin 4: the larger of the one-sided t-tests against -4 and +4.
    above = scipy_stats.t.sf((g.mean() + 4) / se, g.size - 1)
    below = scipy_stats.t.cdf((g.mean() - 4) / se, g.size - 1)
    assert test.p_equiv(4.0) == pytest.approx(max(above, below), rel=1e-4)


def test_without_seed_spread_it_is_the_normal_test_with_the_eval_variance():
    # Identical per-seed gains of 2.0 and a shared eval-set sd of 1 (C = 1).
    rng = np.random.default_rng(3)
    shared = rng.normal(size=4000)
    shared = (shared - shared.mean()) / shared.std(ddof=1)
    boot = 2.0 + np.vstack([shared, shared, shared])
    test = paired_gain_test([2.0, 2.0, 2.0], boot)
    assert test.seed_var == 0.0 and test.eval_var == pytest.approx(1.0)
    assert test.p_diff == pytest.approx(2 * scipy_stats.norm.sf(2.0), rel=1e-6)
    assert test.interval() == pytest.approx((2 - 1.959964, 2 + 1.959964), rel=1e-5)


def test_the_generalized_p_matches_an_independent_integration():
    # tau = S^2 / n and C both present: p(gain <= b) = E_W[1 - Phi((mean - b) / sqrt(C +
    # tau / W))], W ~ chi2_{n-1} / (n-1), integrated here with scipy's quad.
    gains = np.array([3.0, 5.5, 1.0, 4.5])
    rng = np.random.default_rng(11)
    shared = rng.normal(scale=1.3, size=3000)
    boot = gains[:, None] + shared[None, :] + rng.normal(scale=0.2, size=(4, 3000))
    test = paired_gain_test(gains, boot)
    k, tau, c = 3, gains.var(ddof=1) / 4, test.eval_var

    def one_sided(excess: float) -> float:
        def f(w: float) -> float:
            return (
                scipy_stats.norm.sf(excess / math.sqrt(c + tau / w))
                * scipy_stats.chi2.pdf(w * k, k)
                * k
            )

        return integrate.quad(f, 0, np.inf, limit=200)[0]

    mean = gains.mean()
    assert test.p_greater(0) == pytest.approx(one_sided(mean), rel=1e-3)
    assert test.p_less(6.0) == pytest.approx(one_sided(6.0 - mean), rel=1e-3)
    assert test.p_diff == pytest.approx(2 * one_sided(mean), rel=1e-3)
    # The two limits bracket it: the known-C normal test is stricter on the seeds' spread, the
    # t-test that ignores C looser on the eval set's.
    t_only = paired_gain_test(gains, np.repeat(gains[:, None], 2, axis=1)).p_diff
    assert t_only < test.p_diff
    low, high = test.interval(0.95)
    assert test.p_greater(low) == pytest.approx(0.025, abs=1e-6)
    assert test.p_less(high) == pytest.approx(0.025, abs=1e-6)


def test_one_seed_knows_only_the_eval_set():
    boot = np.array([[1.0, 3.0, 2.0, 4.0, 0.0]])  # variance 2.5
    test = paired_gain_test([2.0], boot)
    assert not test.training_known
    assert test.variance == pytest.approx(2.5)
    assert test.p_diff == pytest.approx(2 * scipy_stats.norm.sf(2.0 / math.sqrt(2.5)))


def test_degenerate_cells():
    # Identical runs: gain exactly 0 with no spread anywhere: no difference, inside any margin.
    zero = paired_gain_test([0.0, 0.0, 0.0], np.zeros((3, 10)))
    assert zero.p_diff == 1.0 and zero.p_equiv(1.0) == 0.0 and zero.interval() == (0.0, 0.0)
    # A nonzero gain with no spread at all cannot be judged (not p = 0).
    flat = paired_gain_test([2.0, 2.0], np.full((2, 10), 2.0))
    assert math.isnan(flat.p_diff) and math.isnan(flat.p_equiv(5.0))
    # No eval ranks: the eval part is unknown, so is every p-value.
    unknown = paired_gain_test([1.0, 2.0, 4.0], None)
    assert math.isnan(unknown.p_diff) and not math.isnan(unknown.seed_var)
    assert paired_gain_test([], None).n == 0
