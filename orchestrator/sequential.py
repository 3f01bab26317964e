"""Group-sequential boundaries: a race that looks at its cells after every round and still
keeps the error rate it states.

A race plans its looks before it starts: the seed counts n_1 < ... < n_K at which every open
cell is tested (``Design``). Re-applying a fixed-sample test at each look inflates its error
rate; instead each one-sided test of level ``a`` spends ``a`` over the looks with a
Lan-DeMets spending function f_a(t) (t = n_k / n_K, the planned share of the seeds):

- ``obf`` (O'Brien-Fleming type): f_a(t) = 2 - 2 Phi(z_{1 - a/2} / sqrt(t)), almost nothing
  early, nearly all of ``a`` at the last look;
- ``pocock`` (Pocock type): f_a(t) = a ln(1 + (e - 1) t), evenly over the looks.

The boundary c_k at look k solves P(Z_1 < c_1, ..., Z_{k-1} < c_{k-1}, Z_k >= c_k) =
f_a(t_k) - f_a(t_{k-1}) for a standardised statistic with independent increments (corr(Z_j,
Z_k) = sqrt(t_j / t_k)), computed by numerical integration over the score process (Jennison
and Turnbull, *Group Sequential Methods*, ch. 19). A look's *nominal level* is 1 - Phi(c_k):
a test at look k rejects when its own one-sided p-value is at most that. The t-tests here have
few degrees of freedom; their p-values are compared with the normal design's nominal levels,
the usual way to run a t-test group-sequentially (the simulation tests check the error rate
that results). Seeds are the information scale although the eval-set part of a gain's
variance does not shrink with seeds: that makes consecutive looks more correlated than the
design assumes, which only lowers the chance of crossing (Slepian's inequality).

``Design.sequential_p`` turns a hypothesis' nominal p-values at the looks so far into the
smallest level ``a`` at which it has crossed its boundary: a p-value for the whole
sequential test, which a closed multiple-testing procedure can use as it would a fixed-sample
p (Maurer and Bretz 2013: rejecting one hypothesis raises the others' levels, and their
boundaries at every look so far are recomputed for the new level, which this does). With one
look it is the nominal p itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np
from scipy import optimize
from scipy import stats as scipy_stats

SPENDING = ("obf", "pocock")
DEFAULT_SPENDING = "obf"
# Levels the inversion table spans: below the first a sequential p is reported as that value,
# above the last as 1.
_LEVELS = np.geomspace(1e-12, 0.99, 97)
_GRID = 301  # points per look in the numerical integration


def spent(a: float, t: float, spending: str) -> float:
    """f_a(t): the share of a one-sided level ``a`` spent by information fraction ``t``."""
    if t <= 0:
        return 0.0
    t = min(t, 1.0)
    if spending == "obf":
        z = float(scipy_stats.norm.isf(a / 2))
        return float(2 * scipy_stats.norm.sf(z / math.sqrt(t)))
    if spending == "pocock":
        return a * math.log(1 + (math.e - 1) * t)
    raise ValueError(f"spending {spending!r}: expected one of {', '.join(SPENDING)}")


def boundaries(fractions: tuple[float, ...], increments: tuple[float, ...]) -> np.ndarray:
    """One-sided z boundaries c_1..c_K for looks at information ``fractions`` (ascending,
    last 1) that spend ``increments`` (the crossing probability of each look under the null).
    A look that spends nothing gets +inf."""
    t = np.asarray(fractions, dtype=float)
    out = np.full(t.size, np.inf)
    x = w = f = None  # grid of the score S(t_{k-1}) on the continuation region, its density
    for k, (tk, inc) in enumerate(zip(t, increments, strict=True)):
        if k == 0:
            sd = math.sqrt(tk)
            out[0] = float(scipy_stats.norm.isf(inc)) if inc > 0 else np.inf
            upper = out[0] * sd if np.isfinite(out[0]) else 8 * sd
            x = np.linspace(-8 * sd, upper, _GRID)
            w = _trapezoid_weights(x)
            f = scipy_stats.norm.pdf(x, scale=sd)
            continue
        step = math.sqrt(tk - t[k - 1])
        mass = w * f

        def crossing(b: float, x=x, mass=mass, step=step) -> float:
            return float(mass @ scipy_stats.norm.sf((b - x) / step))

        if inc > 0 and crossing(x[-1] + 12 * step) < inc < crossing(x[0] - 12 * step):
            b = optimize.brentq(
                lambda b, inc=inc: crossing(b) - inc,
                x[0] - 12 * step,
                x[-1] + 12 * step,
                xtol=1e-10,
            )
            out[k] = b / math.sqrt(tk)
        else:
            b = x[-1] + 8 * step
        y = np.linspace(x[0] - 4 * step, b, _GRID)
        f = (scipy_stats.norm.pdf((y[:, None] - x[None, :]) / step) / step) @ mass
        x, w = y, _trapezoid_weights(y)
    return out


def _trapezoid_weights(x: np.ndarray) -> np.ndarray:
    w = np.full(x.size, x[1] - x[0])
    w[0] = w[-1] = (x[1] - x[0]) / 2
    return w


@cache
def _nominal_table(looks: tuple[int, ...], spending: str) -> np.ndarray:
    """Nominal levels, shape (len(_LEVELS), K): row i for one-sided level _LEVELS[i]."""
    fractions = tuple(n / looks[-1] for n in looks)
    rows = []
    for a in _LEVELS:
        cumulative = [spent(float(a), t, spending) for t in fractions]
        increments = tuple(np.diff([0.0, *cumulative]))
        rows.append(scipy_stats.norm.sf(boundaries(fractions, increments)))
    table = np.asarray(rows)
    # A level that spends more everywhere never has a lower nominal level: enforce the
    # monotonicity the integration's last digits may break.
    return np.maximum.accumulate(table, axis=0)


@dataclass(frozen=True)
class Design:
    """The looks a race plans: seed counts ``looks`` (ascending, distinct, >= 1) and the
    spending function. A fixed grid is the design with one look."""

    looks: tuple[int, ...]
    spending: str = DEFAULT_SPENDING

    def __post_init__(self) -> None:
        if not self.looks or any(b <= a for a, b in zip(self.looks, self.looks[1:], strict=False)):
            raise ValueError(f"looks {self.looks}: expected ascending distinct seed counts")
        if self.looks[0] < 1:
            raise ValueError(f"looks {self.looks}: seed counts start at 1")
        if self.spending not in SPENDING:
            raise ValueError(f"spending {self.spending!r}: expected one of {', '.join(SPENDING)}")

    @classmethod
    def race(cls, start_seeds: int, max_seeds: int, spending: str = DEFAULT_SPENDING) -> Design:
        """A race's looks: every seed count from ``start_seeds`` to ``max_seeds`` at which a
        gain has a spread over seeds (2 or more)."""
        looks = tuple(range(max(start_seeds, 2), max_seeds + 1))
        if not looks:
            looks = (max(max_seeds, 2),)
        return cls(looks, spending)

    @property
    def text(self) -> str:
        if len(self.looks) == 1:
            return f"one look at {self.looks[0]} seeds"
        return f"looks at {','.join(map(str, self.looks))} seeds, {self.spending} spending"

    def nominal_levels(self, a: float) -> np.ndarray:
        """The nominal one-sided level of each look for a test of overall level ``a``."""
        if len(self.looks) == 1:
            return np.array([a])
        fractions = tuple(n / self.looks[-1] for n in self.looks)
        cumulative = [spent(a, t, self.spending) for t in fractions]
        return scipy_stats.norm.sf(boundaries(fractions, tuple(np.diff([0.0, *cumulative]))))

    def sequential_p(self, nominal_p: list[float] | tuple[float, ...] | np.ndarray) -> float:
        """The smallest one-sided level at which a test with these nominal p-values at looks
        1, 2, ... (as many as have happened; NaN: no test at that look) has crossed its
        boundary. With one look it is the nominal p; NaN when no look has a p-value."""
        p = np.asarray(nominal_p, dtype=float)
        if p.size > len(self.looks):
            raise ValueError(f"{p.size} looks of a design with {len(self.looks)}")
        if p.size == 0 or np.isnan(p).all():
            return math.nan
        if len(self.looks) == 1:
            return float(p[0])
        columns = _log_columns(self.looks, self.spending)
        best = 1.0
        for k, value in enumerate(p):
            if math.isnan(value):
                continue
            best = min(best, _invert(columns[k], float(value)))
        return best


@cache
def _log_columns(
    looks: tuple[int, ...], spending: str
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...]:
    """Per look: (its nominal levels, their logs where positive, the matching logs of
    _LEVELS), so that inverting a look's p-value costs one interpolation."""
    table = _nominal_table(looks, spending)
    out = []
    for k in range(table.shape[1]):
        levels = table[:, k]
        positive = levels > 0
        out.append((levels, np.log(levels[positive]), np.log(_LEVELS[positive])))
    return tuple(out)


def _invert(column: tuple[np.ndarray, np.ndarray, np.ndarray], p: float) -> float:
    """The level a at which the look's nominal level equals ``p`` (log-log interpolation)."""
    levels, log_levels, log_targets = column
    if p <= levels[0]:
        return float(_LEVELS[0])
    if p > levels[-1]:
        return 1.0
    return float(np.exp(np.interp(math.log(p), log_levels, log_targets)))
