"""Expected hits under a random order of ties: by hand, against every order, old files."""

from __future__ import annotations

from fractions import Fraction
from itertools import permutations

import numpy as np
import pytest

from trainers.recall import (
    RANK_FIELDS,
    expected_hits,
    hit_table,
    recall_metrics,
    with_tie_defaults,
)


def every_order(rank: int, ties: int, own: int, k: int) -> Fraction:
    """Share of the orders of ``ties`` other and ``own`` true tied items, behind ``rank``
    others, that put a true item in the first ``k`` places."""
    items = [False] * ties + [True] * own
    orders = list(permutations(items))
    hits = sum(any(order[: max(k - rank, 0)]) for order in orders)
    return Fraction(hits, len(orders))


@pytest.mark.parametrize("own", [1, 2, 3])
@pytest.mark.parametrize("ties", [0, 1, 2, 4])
@pytest.mark.parametrize("rank", [0, 2])
def test_expected_hit_is_the_share_of_orders_that_hit(rank: int, ties: int, own: int) -> None:
    for k in range(1, rank + ties + own + 2):
        got = expected_hits(rank, ties, own, k)
        assert got.dtype == np.float64
        assert float(got) == pytest.approx(float(every_order(rank, ties, own, k)), abs=1e-15)


def test_expected_hits_by_hand() -> None:
    # A caption tied with 3 other images behind 1 above: the 4 places behind it are equally
    # likely, so R@1 0, R@2 1/4, R@3 1/2, R@5 1. An image with 2 own captions tied with 2
    # others: the first of the 4 is its own with 1 - C(3, 2) / C(4, 2) = 1/2, within the first
    # 2 with 1 - C(2, 2) / C(4, 2) = 5/6, within 3 surely.
    assert expected_hits(1, 3, 1, 1) == 0.0
    assert expected_hits(1, 3, 1, 2) == 0.25
    assert expected_hits(1, 3, 1, 3) == 0.5
    assert expected_hits(1, 3, 1, 5) == 1.0
    assert expected_hits([0, 0, 0], 2, 2, np.array(1)).tolist() == [0.5] * 3
    assert expected_hits(0, 2, 2, 2) == pytest.approx(5 / 6)
    assert expected_hits(0, 2, 2, 3) == 1.0
    # No tie: a plain rank test.
    assert expected_hits([0, 4, 5], 0, 1, 5).tolist() == [1.0, 1.0, 0.0]


def test_a_file_without_tie_arrays_reads_as_no_ties() -> None:
    old = {"t2i_rank": [0, 3, 1], "i2t_rank": [2, 0], "text_to_image": [0, 1, 1]}
    full = with_tie_defaults(old)
    assert list(full) == list(RANK_FIELDS)
    assert full["t2i_ties"].tolist() == [0, 0, 0] and full["i2t_ties"].tolist() == [0, 0]
    assert full["i2t_own"].tolist() == [1, 1] and full["t2i_rank"].dtype == np.int64
    metrics = recall_metrics(old, ks=(1, 2))
    # t2i ranks 0, 3, 1: 1/3 below 1, 2/3 below 2; i2t ranks 2, 0: 1/2 below both.
    assert metrics == pytest.approx({
        "t2i_R1": 100 / 3, "t2i_R2": 200 / 3, "i2t_R1": 50.0, "i2t_R2": 50.0,
        "rsum": 100 + 100, "mean_recall": 200 / 4,
    })  # fmt: skip
    assert list(hit_table(old, (1, 2))) == ["t2i_R1", "t2i_R2", "i2t_R1", "i2t_R2"]
