"""Statistics behind the strategy-selection table: intervals, tests, corrections, bootstrap.

Pure numpy/scipy on arrays; no MLflow, no pandas frames, so every function is testable alone
and usable by other callers (seed racing). Two independent sources of noise are measured:

- *training noise* (initialisation and data order, one draw per seed): Student-t intervals and
  one-sample t-tests over seeds, on paired per-seed gains ``cell_s - baseline_s``;
- *evaluation noise* (which queries the eval set happens to hold): a paired cluster bootstrap
  over eval images, each image resampled together with all of its captions.

Recalls are percent (0-100), rsum their sum over K in ``KS`` and both directions (0-600),
mean_recall = rsum / 6.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats as scipy_stats

from trainers.recall import TIE_DEFAULTS, hit_table, recall_metrics

KS = (1, 5, 10)
# Arrays every eval-ranks file holds; the tie arrays (TIE_KEYS) came later, and a file without
# them reads as ties 0 and own 1 (trainers.recall.with_tie_defaults).
RANK_KEYS = ("t2i_rank", "i2t_rank", "text_to_image")
TIE_KEYS = tuple(TIE_DEFAULTS)
RANK_RECALLS = tuple(f"{d}_R{k}" for d in ("t2i", "i2t") for k in KS)
# Metrics a bootstrap over eval queries can recompute from the ranks alone.
RANK_METRICS = (*RANK_RECALLS, "rsum", "mean_recall")
Correction = Literal["holm", "bh"]
CORRECTIONS: tuple[str, ...] = ("holm", "bh")
DEFAULT_N_BOOT = 2000
DEFAULT_BOOT_SEED = 0

Ranks = Mapping[str, np.ndarray]


# ------------------------------------------------------------------------------ over seeds
def t_interval(values: ArrayLike, confidence: float = 0.95) -> tuple[float, float, float, float]:
    """``(mean, std, low, high)`` of 1-D ``values``: sample std (ddof=1) and the Student-t
    interval ``mean ± t_{(1+confidence)/2, n-1} * std / sqrt(n)``. NaNs in ``values`` are
    dropped first. n = 0: all NaN; n = 1: ``(value, nan, nan, nan)`` (one draw says nothing
    about its spread)."""
    x = _finite(values)
    n = x.size
    if n == 0:
        return (np.nan, np.nan, np.nan, np.nan)
    mean = float(x.mean())
    if n == 1:
        return (mean, np.nan, np.nan, np.nan)
    std = float(x.std(ddof=1))
    half = float(scipy_stats.t.ppf((1 + confidence) / 2, n - 1)) * std / np.sqrt(n)
    return (mean, std, mean - half, mean + half)


def t_test_p(values: ArrayLike) -> float:
    """Two-sided p of the one-sample t-test of mean(``values``) = 0 (n - 1 df), NaNs dropped.

    NaN when fewer than 2 values. With zero spread (all values equal) the t statistic is
    infinite or undefined: p = 0 for a nonzero common value, 1 when every value is 0 (scipy
    returns NaN there; "no difference at all" is the honest answer)."""
    x = _finite(values)
    if x.size < 2:
        return np.nan
    return projected_p(float(x.mean()), float(x.std(ddof=1)), x.size)


def projected_p(mean: float, std: float, n: int) -> float:
    """The two-sided p of the one-sample t-test (n - 1 df) on ``n`` values whose mean and
    sample standard deviation are ``mean`` and ``std``: what ``t_test_p`` gives for such
    values, and, with the observed mean and spread of fewer seeds, a planning projection of
    the p a cell would reach at ``n`` seeds if they held. NaN when n < 2 or an input is not
    finite; zero spread as in ``t_test_p`` (0 for a nonzero mean, 1 for mean 0)."""
    if n < 2 or not (np.isfinite(mean) and np.isfinite(std)):
        return np.nan
    if std == 0.0:
        return 1.0 if mean == 0.0 else 0.0
    t = mean / (std / np.sqrt(n))
    return float(2 * scipy_stats.t.sf(abs(t), n - 1))


def _finite(values: ArrayLike) -> np.ndarray:
    x = np.asarray(values, dtype=float).ravel()
    return x[~np.isnan(x)]


# ------------------------------------------------------------------------------ corrections
def adjust_pvalues(p_values: ArrayLike, method: Correction = "holm") -> np.ndarray:
    """Multiplicity-adjusted p-values, same shape and order as ``p_values``.

    ``holm``: Holm's step-down (family-wise error), ``p_adj(i) = max_{j<=i} min(1, (m-j+1)
    p_(j))`` over the ascending order; ``bh``: Benjamini-Hochberg (false discovery rate),
    ``p_adj(i) = min_{j>=i} min(1, m/j p_(j))``. NaN entries stay NaN and are not members of
    the family (m counts the finite ones). Tied p-values get equal adjusted values (the running
    max / min makes the sort order among ties irrelevant)."""
    if method not in CORRECTIONS:
        raise ValueError(f"correction {method!r}: expected one of {', '.join(CORRECTIONS)}")
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    flat = p.ravel()
    members = np.flatnonzero(~np.isnan(flat))
    m = members.size
    if m == 0:
        return out
    order = members[np.argsort(flat[members], kind="stable")]
    ranked = flat[order]
    j = np.arange(1, m + 1)
    if method == "holm":
        adjusted = np.maximum.accumulate(np.minimum(1.0, (m - j + 1) * ranked))
    else:
        adjusted = np.minimum.accumulate(np.minimum(1.0, m / j * ranked)[::-1])[::-1]
    result = out.ravel()
    result[order] = adjusted
    return result.reshape(p.shape)


# ------------------------------------------------------------------------------ eval ranks
def check_ranks(ranks: Ranks) -> str | None:
    """What is wrong with an ``eval_ranks`` mapping, None when it is usable.

    Expected: integer 1-D arrays ``t2i_rank`` (N_txt; per caption, the number of images that
    score above its own image's tie band, i.e. its 0-based rank), ``i2t_rank`` (N_img; per
    image, the captions of other images above the tie band of its best own caption) and
    ``text_to_image`` (N_txt image ids in [0, N_img)), with every image owning at least one
    caption; optionally ``t2i_ties`` (N_txt), ``i2t_ties`` (N_img, both >= 0) and ``i2t_own``
    (N_img, from 1 to the image's caption count), see ``trainers.recall``."""
    missing = [k for k in RANK_KEYS if k not in ranks]
    if missing:
        return f"missing {', '.join(missing)}"
    keys = [*RANK_KEYS, *(k for k in TIE_KEYS if k in ranks)]
    arrays = {k: np.asarray(ranks[k]) for k in keys}
    for key, array in arrays.items():
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            return f"{key}: expected a 1-D integer array, got {array.dtype} {array.shape}"
    n_img, n_txt = arrays["i2t_rank"].size, arrays["t2i_rank"].size
    ids = arrays["text_to_image"]
    if n_img == 0 or ids.size != n_txt:
        return f"text_to_image has {ids.size} ids for {n_txt} captions and {n_img} images"
    if ids.min() < 0 or ids.max() >= n_img:
        return f"text_to_image ids outside [0, {n_img})"
    captions = np.bincount(ids, minlength=n_img)
    if captions.min() == 0:
        return "an image has no caption"
    sizes = {"t2i_ties": n_txt, "i2t_ties": n_img, "i2t_own": n_img}
    for key, size in sizes.items():
        if key in arrays and arrays[key].size != size:
            return f"{key} has {arrays[key].size} entries for {n_txt} captions and {n_img} images"
    lowest = {"t2i_rank": 0, "i2t_rank": 0, "t2i_ties": 0, "i2t_ties": 0, "i2t_own": 1}
    for key, low in lowest.items():
        if key in arrays and arrays[key].min() < low:
            return f"{key}: expected values >= {low}, got {arrays[key].min()}"
    if "i2t_own" in arrays and (arrays["i2t_own"] > captions).any():
        return "i2t_own: more own captions at the best score than the image has"
    return None


def eval_set_id(ranks: Ranks) -> str:
    """Identity of the eval set the ranks were computed on: N_img plus a digest of
    ``text_to_image``; two runs can be compared query by query only when these agree."""
    ids = np.ascontiguousarray(np.asarray(ranks["text_to_image"], dtype=np.int64))
    digest = hashlib.sha1(ids.tobytes()).hexdigest()[:12]
    return f"{np.asarray(ranks['i2t_rank']).size} images, {ids.size} captions, id {digest}"


def recalls_from_ranks(ranks: Ranks, ks: Sequence[int] = KS) -> dict[str, float]:
    """``t2i_R{k}, i2t_R{k}`` (percent), ``rsum`` and ``mean_recall`` of one run's ranks:
    ``R@K = 100 * mean expected hit`` over the captions (t2i) or images (i2t), each query's
    ties ordered at random (``trainers.recall``; without tie arrays, ``100 * mean(rank < K)``).
    """
    return recall_metrics(ranks, ks)


# ------------------------------------------------------------------------------ bootstrap
def bootstrap_indices(
    n_images: int, n_boot: int = DEFAULT_N_BOOT, seed: int = DEFAULT_BOOT_SEED
) -> np.ndarray:
    """``n_boot x n_images`` int64 matrix: row b is resample b, image ids drawn uniformly with
    replacement by ``numpy.random.default_rng(seed)`` (so the same arguments give the same
    draw on every machine)."""
    if n_images < 1 or n_boot < 1:
        raise ValueError(f"bootstrap: need n_images >= 1 and n_boot >= 1, got {n_images}, {n_boot}")
    return np.random.default_rng(seed).integers(0, n_images, size=(n_boot, n_images))


class QueryBootstrap:
    """One shared draw of resamples of an eval set's images, applied to any run's ranks.

    Using the same draw for every run makes run-to-run comparisons paired over queries: in
    resample b every run is scored on the same images. Resample b of a run's t2i recall uses
    all captions of the drawn images (an image drawn twice counts its captions twice); its
    i2t recall uses the drawn images. Each run is reduced to a per-image table of expected
    hits (N_img x (1 + 2 len(ks)): caption count, the sum of its captions' t2i hits, its i2t
    hit; ``trainers.recall``), so a run costs one ``counts @ table`` product, and a resample
    that draws every image once gives ``recalls_from_ranks`` of the whole set.
    """

    def __init__(self, indices: np.ndarray, ks: Sequence[int] = KS) -> None:
        """``indices``: B x N_img image ids (``bootstrap_indices``)."""
        indices = np.asarray(indices)
        if indices.ndim != 2 or indices.shape[1] == 0:
            raise ValueError(f"bootstrap: indices must be B x N_img, got {indices.shape}")
        self.n_boot, self.n_images = indices.shape
        self.ks = tuple(ks)
        # Multiplicity of every image in every resample, float64 like the table: a tie's
        # expected hit is a fraction, which float32 sums would round.
        counts = np.zeros(indices.shape, dtype=np.float64)
        for b, row in enumerate(indices):
            counts[b] = np.bincount(row, minlength=self.n_images)
        self.counts = counts

    def recalls(self, ranks: Ranks) -> dict[str, np.ndarray]:
        """Every ``RANK_METRICS`` entry as a length-B float64 array (percent). ValueError when
        the ranks do not belong to an eval set of ``n_images`` images."""
        problem = check_ranks(ranks)
        if problem is None and np.asarray(ranks["i2t_rank"]).size != self.n_images:
            problem = f"{np.asarray(ranks['i2t_rank']).size} images, the draw has {self.n_images}"
        if problem is not None:
            raise ValueError(f"eval ranks: {problem}")
        ids = np.asarray(ranks["text_to_image"])
        hits = hit_table(ranks, self.ks)
        columns = [np.bincount(ids, minlength=self.n_images).astype(np.float64)]
        columns += [
            np.bincount(ids, weights=hits[f"t2i_R{k}"], minlength=self.n_images) for k in self.ks
        ]
        columns += [hits[f"i2t_R{k}"] for k in self.ks]
        table = np.stack(columns, axis=1)
        sums = self.counts @ table
        captions = sums[:, 0]
        metrics: dict[str, np.ndarray] = {}
        for j, k in enumerate(self.ks):
            metrics[f"t2i_R{k}"] = 100.0 * sums[:, 1 + j] / captions
        for j, k in enumerate(self.ks):
            metrics[f"i2t_R{k}"] = 100.0 * sums[:, 1 + len(self.ks) + j] / self.n_images
        metrics["rsum"] = np.sum([metrics[name] for name in list(metrics)], axis=0)
        metrics["mean_recall"] = metrics["rsum"] / (2 * len(self.ks))
        return metrics

    def metric(self, ranks: Ranks, metric: str) -> np.ndarray:
        """Length-B array of one ``RANK_METRICS`` entry; KeyError for another metric."""
        if metric not in RANK_METRICS:
            raise KeyError(f"{metric} is not computable from eval ranks ({RANK_METRICS})")
        return self.recalls(ranks)[metric]


def percentile_interval(samples: ArrayLike, confidence: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval: the ``(1-confidence)/2`` and ``(1+confidence)/2``
    quantiles of ``samples`` (numpy's linear interpolation); NaN for no samples."""
    x = np.asarray(samples, dtype=float).ravel()
    if x.size == 0 or np.isnan(x).any():
        return (np.nan, np.nan)
    low, high = np.percentile(x, [50 * (1 - confidence), 50 * (1 + confidence)])
    return (float(low), float(high))


def bootstrap_p(gains: ArrayLike) -> float:
    """Two-sided bootstrap p of "gain = 0" from B resampled gains:
    ``min(1, 2 min((#{g <= 0} + 1) / (B + 1), (#{g >= 0} + 1) / (B + 1)))``. The +1 keeps it
    above 0 (the smallest reportable p is 2 / (B + 1)); all-zero gains give 1. NaN for none."""
    g = np.asarray(gains, dtype=float).ravel()
    if g.size == 0 or np.isnan(g).any():
        return np.nan
    b = g.size
    below = (np.count_nonzero(g <= 0) + 1) / (b + 1)
    above = (np.count_nonzero(g >= 0) + 1) / (b + 1)
    return float(min(1.0, 2 * min(below, above)))
