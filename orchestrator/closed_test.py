"""One error-controlled family for every cell's two questions: does it differ from the baseline,
and is it equivalent to it (its gain inside +-D)?

Each cell c has two nulls: H_diff(c) "gain = 0" and H_eq(c) "|gain| >= D". They are disjoint:
at most one of them is true, so a family of 2m nulls holds at most m true ones. Closed testing
with Bonferroni tests of every intersection that can be true (Shaffer 1986) uses that: an
intersection holds at most one null per cell, and H_h of cell c is rejected when every such
intersection containing it is. The hardest of those picks, from every other cell, its null
with the larger p-value, so H_h is rejected exactly when Holm's step-down at ``alpha`` rejects
p_h among the m values {p_h} + {max(p_diff(c'), p_eq(c')) : c' != c}. Holm over 2m values
would divide ``alpha`` by up to 2m; this divides it by at most m, so asking the equivalence
question costs the difference question nothing.

The inputs may be sequential p-values (``orchestrator.sequential``): the closed procedure is
the same, with each hypothesis' group-sequential test in place of its fixed-sample one.
NaN p-values (a cell with nothing to test) are not members. Benjamini-Hochberg (``bh``) is the
screen: the step-up over all 2m values, controlling the false discovery rate.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from orchestrator import stats

CORRECTIONS: tuple[str, ...] = ("holm", "bh")


def adjusted(p_diff: ArrayLike, p_equiv: ArrayLike, correction: str = "holm"):
    """Adjusted p-values ``(diff_adj, equiv_adj)``, arrays of the inputs' length (one entry per
    cell, NaN where the input is NaN). A null is rejected at level alpha when its adjusted
    value is below alpha. ``holm``: the closed procedure above (family-wise error);
    ``bh``: Benjamini-Hochberg over the 2m values (false discovery rate)."""
    d = np.asarray(p_diff, dtype=float).ravel()
    e = np.asarray(p_equiv, dtype=float).ravel()
    if d.shape != e.shape:
        raise ValueError(f"{d.size} difference and {e.size} equivalence p-values")
    if correction == "bh":
        joint = stats.adjust_pvalues(np.concatenate([d, e]), "bh")
        return joint[: d.size], joint[d.size :]
    if correction != "holm":
        raise ValueError(f"correction {correction!r}: expected one of {', '.join(CORRECTIONS)}")
    worst = np.fmax(d, e)  # fmax: a NaN partner leaves the other value
    worst[np.isnan(d) & np.isnan(e)] = np.nan
    out_d, out_e = np.full(d.size, np.nan), np.full(e.size, np.nan)
    for c in range(d.size):
        others = np.delete(worst, c)
        others = others[~np.isnan(others)]
        for value, out in ((d[c], out_d), (e[c], out_e)):
            if not np.isnan(value):
                out[c] = _holm_of_first(value, others)
    return out_d, out_e


def _holm_of_first(value: float, others: np.ndarray) -> float:
    """Holm's adjusted p of ``value`` in the family ``[value, *others]``: the running max of
    (m - j + 1) p_(j) up to its place, ties placed after ``value`` (they share its value)."""
    family = np.sort(np.concatenate([[value], others]))
    m = family.size
    place = int(np.searchsorted(family, value, side="left"))
    steps = (m - np.arange(place + 1)) * family[: place + 1]
    return float(min(1.0, steps.max()))
