"""One test per cell that carries both noises: training (which seed) and evaluation (which
images the eval set holds).

A cell's gain is paired: ``g_s = cell_s - baseline_s`` over the seeds both finished, each on the
same eval set. Model the gain of seed s as ``mu + a + b_s + e_s``: ``a`` is an eval-set effect
shared by every seed (the cell happens to do well on these particular images), ``b_s`` the part
of the eval-set noise that differs from seed to seed, ``e_s`` training noise. Over seeds on one
eval set ``a`` is constant, so the spread over seeds estimates ``var(b) + var(e)`` and never sees
``a``; a paired cluster bootstrap over eval images (the same resamples for every run) sees
``a`` as the covariance, across seeds, of the resampled gains. The variance of the mean gain
over both draws is therefore

    V = tau + C,    tau = S^2 / n,    C = mean over seed pairs s != s' of cov_b(g_s^b, g_s'^b)

(S^2 the sample variance of the gains over seeds; C clipped at 0): the correlated t-test's
variance (Nadeau and Bengio 2003; Benavoli et al. 2017) with the correlation read off the
bootstrap instead of assumed.

How to turn ``mean / sqrt(V)`` into a p-value is the Behrens-Fisher question with one
variance estimated (tau, n - 1 degrees of freedom) and one known (C, from hundreds of images).
Neither textbook answer holds: a t with n - 1 df ignores that C is known and is far too
strict at the levels a corrected family needs; Welch-Satterthwaite's df plugs the estimated
split in and rejects two to three times too often at those levels when tau is
underestimated (the simulation tests measure both). The test here is Weerahandi's
generalized p-value (Tsui and Weerahandi 1989): with the fiducial variance
``V* = C + tau / W``, ``W ~ chi2_{n-1} / (n - 1)``, the one-sided p of "gain <= b" is
``E_W[1 - Phi((mean - b) / sqrt(V*))]``. With C = 0 it is the t-test exactly, with tau = 0 the
normal test with C, and in between it stays at or below its level. The p-values are
continuous (no resampling floor), so a family of any size can reject.

With one seed only the eval-set part is known (``V`` is the one seed's bootstrap variance of
its gain, a normal test); the result says so (``training_known`` False) and no verdict is
taken from it. Units are the metric's (rsum: 0-600). Pure numpy/scipy: no MLflow, no pandas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np
from numpy.typing import ArrayLike
from scipy import optimize, special
from scipy import stats as scipy_stats

# Nodes of E_W[...]: Gauss-Legendre in v on (0, 1) with u = v^8 the probability level of W, so
# the small W that dominate a far tail get most of the nodes (t tails match scipy to 0.1%
# down to 1e-12).
_NODES, _POWER = 160, 8


@cache
def _fiducial_nodes(dof: int) -> tuple[np.ndarray, np.ndarray]:
    """(values of W ~ chi2_dof / dof, weights) for expectations over W."""
    x, w = np.polynomial.legendre.leggauss(_NODES)
    v = (x + 1) / 2
    u = v**_POWER
    weights = _POWER * v ** (_POWER - 1) * w / 2
    values = scipy_stats.chi2.ppf(u, dof) / dof
    return np.maximum(values, 1e-300), weights


@dataclass(frozen=True)
class GainTest:
    """The mean paired gain of ``n`` seeds and the two parts of its variance.

    ``seed_var``: tau = S^2 / n (NaN when n < 2); ``eval_var``: the shared eval-set variance C
    (n >= 2) or the one seed's whole bootstrap variance (n = 1), NaN without bootstrap
    resamples. Every p-value is NaN when the test is undefined: n = 0, no bootstrap, or zero
    variance with a nonzero mean (identical per-seed gains and no eval-set spread: nothing to
    judge the gain against). Zero variance with a zero mean (identical runs) is "no
    difference at all": the gain is exactly 0."""

    n: int
    mean: float
    seed_var: float
    eval_var: float

    @property
    def training_known(self) -> bool:
        return self.n >= 2

    @property
    def variance(self) -> float:
        """V = tau + C (with one seed, C alone)."""
        if self.n == 0 or math.isnan(self.eval_var):
            return math.nan
        if self.n == 1:
            return self.eval_var
        return self.seed_var + self.eval_var

    @property
    def se(self) -> float:
        return math.sqrt(self.variance) if not math.isnan(self.variance) else math.nan

    @property
    def eval_share(self) -> float:
        """The eval set's share of the variance of the mean gain (0-1)."""
        v = self.variance
        return self.eval_var / v if v and not math.isnan(v) else math.nan

    def _scales(self) -> tuple[np.ndarray, np.ndarray]:
        """sqrt(V*) at the nodes of W and their weights (one node for a known variance)."""
        if self.n < 2 or self.seed_var == 0:
            return np.array([math.sqrt(self.variance)]), np.array([1.0])
        w, weights = _fiducial_nodes(self.n - 1)
        return np.sqrt(self.eval_var + self.seed_var / w), weights

    def _tail(self, excess: float) -> float:
        """E_W[1 - Phi(excess / sqrt(V*))]: the p of "the gain is not above the bound" when
        the mean exceeds it by ``excess``."""
        scales, weights = self._scales()
        # ndtr(-x) is norm.sf(x) to the bit, without scipy.stats' per-call argument checks.
        return float(min(1.0, weights @ special.ndtr(-excess / scales)))

    def _side(self, bound: float, upper: bool) -> float:
        if math.isnan(self.variance) or math.isnan(self.mean):
            return math.nan
        excess = self.mean - bound if upper else bound - self.mean
        if self.variance == 0:
            if self.mean != 0:
                return math.nan  # a nonzero gain with no spread at all: nothing to judge by
            # Identical runs: the gain is exactly 0, so a bound strictly on one side of it is
            # ruled out and a bound at 0 is not.
            return 0.0 if excess > 0 else 1.0
        return self._tail(excess)

    def p_greater(self, bound: float = 0.0) -> float:
        """One-sided p of "mean gain <= bound" (small: the gain is above ``bound``)."""
        return self._side(bound, upper=True)

    def p_less(self, bound: float = 0.0) -> float:
        """One-sided p of "mean gain >= bound" (small: the gain is below ``bound``)."""
        return self._side(bound, upper=False)

    @property
    def p_diff(self) -> float:
        """Two-sided p of "mean gain = 0": twice the smaller one-sided p, at most 1."""
        up, down = self.p_greater(0.0), self.p_less(0.0)
        if math.isnan(up) or math.isnan(down):
            return math.nan
        return min(1.0, 2 * min(up, down))

    def p_equiv(self, margin: float) -> float:
        """TOST p of "|mean gain| >= margin": the larger of the two one-sided p-values (the
        gain is above -margin; the gain is below +margin). Small: the gain lies inside
        +-margin."""
        low, high = self.p_greater(-margin), self.p_less(margin)
        if math.isnan(low) or math.isnan(high):
            return math.nan
        return max(low, high)

    def interval(self, confidence: float = 0.95) -> tuple[float, float]:
        """The generalized confidence interval of the mean gain: ``mean +- h`` with h the
        ``(1 + confidence) / 2`` quantile of ``Z sqrt(V*)`` (the t interval when C = 0)."""
        if math.isnan(self.variance) or math.isnan(self.mean):
            return (math.nan, math.nan)
        if self.variance == 0:
            return (self.mean, self.mean)
        tail = (1 - confidence) / 2
        # The mixture's tail lies below the t_{n-1} tail scaled by sqrt(V) (sqrt(C + tau / W)
        # <= sqrt(V / min(W, 1))), so that quantile brackets the half-width.
        dof = self.n - 1 if self.n >= 2 and self.seed_var > 0 else math.inf
        high = float(scipy_stats.t.isf(tail, dof)) * self.se * 1.001
        half = optimize.brentq(lambda h: self._tail(h) - tail, 0.0, high, xtol=1e-12 * high)
        return (self.mean - half, self.mean + half)


def paired_gain_test(gains: ArrayLike, boot_gains: ArrayLike | None) -> GainTest:
    """The test of a cell's mean paired gain.

    ``gains``: shape (n,), the per-seed gains on the full eval set; ``boot_gains``: shape
    (n, B), the same gains under B shared bootstrap resamples of the eval images (row s is
    seed s), or None when the runs logged no eval ranks (then the eval part, and every
    p-value, is NaN)."""
    g = np.asarray(gains, dtype=float).ravel()
    n = int(g.size)
    if n == 0 or np.isnan(g).any():
        return GainTest(0, math.nan, math.nan, math.nan)
    mean = float(g.mean())
    seed_var = float(g.var(ddof=1)) / n if n >= 2 else math.nan
    eval_var = math.nan
    if boot_gains is not None:
        b = np.asarray(boot_gains, dtype=float).reshape(n, -1)
        if b.shape[1] >= 2 and not np.isnan(b).any():
            eval_var = shared_eval_variance(b)
    return GainTest(n, mean, seed_var, eval_var)


def shared_eval_variance(boot_gains: np.ndarray) -> float:
    """C from an (n, B) array of bootstrap gains: the mean off-diagonal covariance over seeds
    (ddof 1 over resamples), clipped at 0; for n = 1 the one seed's bootstrap variance.

    Computed as (n^2 var_b(mean_s g) - sum_s var_b(g_s)) / (n (n - 1)), which equals the mean
    of the n (n - 1) off-diagonal covariances without forming the n x n matrix."""
    n = boot_gains.shape[0]
    per_seed = boot_gains.var(axis=1, ddof=1)
    if n == 1:
        return float(per_seed[0])
    of_mean = float(boot_gains.mean(axis=0).var(ddof=1))
    shared = (n * n * of_mean - float(per_seed.sum())) / (n * (n - 1))
    return max(shared, 0.0)
