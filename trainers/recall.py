"""Recall@K that no tie can game: the expected hit of a query under a random order of ties.

A query's true match may score the same as other items: a text tower that returns one vector
for every caption ties every caption for every image. Counting only strictly greater scores
(a tie favours the true match) would give that tower image->text R@1 = 100. Here a query whose
true items tie with others gets its *expected* hit under a uniformly random order of the tied
items, which is what an argsort with random tie-breaking gives on average.

Per query, with scores split into three groups around the true score s*:

- ``rank``: items of other images scoring above the tie band of s* (they come first);
- ``ties``: items of other images inside the band (tied with the true items);
- ``own``: true items inside the band (>= 1; a caption has one true image, an image may have
  several captions at its best score).

In a random order of the ``ties + own`` tied items the query hits at K when one of its own
items lands among the first ``j = K - rank`` of them: 0 for j <= 0, 1 for j > ties, else
``1 - C(ties + own - j, own) / C(ties + own, own)``; for own = 1 that is ``j / (ties + 1)``.

Pure numpy, no torch, so the trainer's eval (``trainers.evaluate``) and the orchestrator's
bootstrap over eval queries (``orchestrator.stats``) score with the same code. The arrays are
the ones a run writes to ``eval_ranks.npz``: ``t2i_rank``, ``t2i_ties`` (N_txt), ``i2t_rank``,
``i2t_ties``, ``i2t_own`` (N_img), all integer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike

# Per-query arrays of the ranks file, in the order retrieval_metrics reports the directions.
RANK_FIELDS = ("t2i_rank", "t2i_ties", "i2t_rank", "i2t_ties", "i2t_own")
# Files written before ties were counted hold only the ranks: there the tie arrays read as
# "no tie" (ties 0) and "one best own caption" (own 1), which is what those ranks meant.
TIE_DEFAULTS = {"t2i_ties": 0, "i2t_ties": 0, "i2t_own": 1}


def expected_hits(rank: ArrayLike, ties: ArrayLike, own: ArrayLike, k: int) -> np.ndarray:
    """Expected hit at ``k`` of each query (float64 in [0, 1], the broadcast shape of the
    inputs) from its ``rank`` (>= 0), ``ties`` (>= 0) and ``own`` (>= 1) as the module
    docstring defines them."""
    rank, ties, own = np.broadcast_arrays(
        *(np.asarray(a, dtype=np.int64) for a in (rank, ties, own))
    )
    j = k - rank
    group = ties + own
    inside = (j > 0) & (j <= ties)
    # P(no own item among the first j tied ones) = C(group - j, own) / C(group, own), as the
    # product over i < own of (group - j - i) / (group - i); factors past a query's own count
    # are 1. Where j is outside [1, ties] the value is not used (and j is clipped to keep the
    # factors finite).
    jj = np.clip(j, 0, ties)
    miss = np.ones(rank.shape, dtype=np.float64)
    for i in range(int(own.max(initial=1))):
        counted = i < own
        miss *= np.where(counted, (group - jj - i) / np.where(counted, group - i, 1), 1.0)
    # For own = 1 the direct ratio, so a caption's hit is exactly (K - rank) / (ties + 1).
    hit = np.where(own == 1, jj / group, 1.0 - miss)
    return np.where(j > ties, 1.0, np.where(inside, hit, 0.0))


def with_tie_defaults(ranks: Mapping[str, ArrayLike]) -> dict[str, np.ndarray]:
    """The five ``RANK_FIELDS`` of a ranks mapping (e.g. a loaded ``eval_ranks.npz``) as int64
    arrays, tie arrays a file lacks filled with ``TIE_DEFAULTS``; other keys are dropped."""
    out = {
        "t2i_rank": np.asarray(ranks["t2i_rank"], dtype=np.int64),
        "i2t_rank": np.asarray(ranks["i2t_rank"], dtype=np.int64),
    }
    for key, default in TIE_DEFAULTS.items():
        shape = out[f"{key[:3]}_rank"].shape
        value = ranks[key] if key in ranks else np.full(shape, default)
        out[key] = np.asarray(value, dtype=np.int64)
    return {key: out[key] for key in RANK_FIELDS}


def hit_table(ranks: Mapping[str, ArrayLike], ks: Sequence[int]) -> dict[str, np.ndarray]:
    """``t2i_R{k}`` (N_txt) and ``i2t_R{k}`` (N_img) per-query expected hits (float64, 0-1)
    for every k in ``ks``, t2i keys first; tie arrays missing from ``ranks`` as in
    ``with_tie_defaults``."""
    r = with_tie_defaults(ranks)
    hits = {f"t2i_R{k}": expected_hits(r["t2i_rank"], r["t2i_ties"], 1, k) for k in ks}
    hits |= {f"i2t_R{k}": expected_hits(r["i2t_rank"], r["i2t_ties"], r["i2t_own"], k) for k in ks}
    return hits


def with_sums(recalls: dict[str, float]) -> dict[str, float]:
    """``recalls`` (percent) followed by ``rsum`` (their sum) and ``mean_recall`` (their mean)."""
    rsum = float(sum(recalls.values()))
    return {**recalls, "rsum": rsum, "mean_recall": rsum / len(recalls)}


def recall_metrics(ranks: Mapping[str, ArrayLike], ks: Sequence[int]) -> dict[str, float]:
    """``t2i_R{k}``, ``i2t_R{k}`` (percent: 100 x the mean expected hit over the queries),
    ``rsum`` and ``mean_recall`` of one eval's ranks, as Python floats."""
    recalls = {name: 100.0 * float(np.mean(hit)) for name, hit in hit_table(ranks, ks).items()}
    return with_sums(recalls)
