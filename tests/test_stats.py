"""orchestrator.stats on hand-made numbers: t intervals and tests (scipy as the independent
reference), Holm / Benjamini-Hochberg on hand-computed examples, recalls from ranks, and the
cluster bootstrap against a direct loop over resamples, queries and captions."""

from __future__ import annotations

from math import comb

import numpy as np
import pytest
from scipy import stats as scipy_stats

from orchestrator import stats

# t_{0.975, 2} from a printed t table (4.303), to more digits.
T_975_2 = 4.302652729749


def test_t_interval_matches_hand_computation_and_scipy():
    mean, std, low, high = stats.t_interval([126.0, 138.0, 150.0])
    # mean 138, sample std 12, half-width 4.3027 * 12 / sqrt(3) = 29.8097
    assert (mean, std) == (138.0, 12.0)
    assert low == pytest.approx(138 - T_975_2 * 12 / np.sqrt(3))
    assert high == pytest.approx(138 + T_975_2 * 12 / np.sqrt(3))
    assert low == pytest.approx(108.190347, abs=1e-6)
    x = np.array([3.1, -0.4, 2.2, 5.0, 1.7, 0.9])
    ref = scipy_stats.t.interval(0.9, len(x) - 1, loc=x.mean(), scale=scipy_stats.sem(x))
    assert stats.t_interval(x, confidence=0.9)[2:] == pytest.approx(ref)


def test_t_interval_small_samples_and_nans():
    assert stats.t_interval([7.5])[0] == 7.5
    assert np.isnan(stats.t_interval([7.5])[1:]).all()
    assert np.isnan(stats.t_interval([])).all()
    assert stats.t_interval([1.0, np.nan, 3.0])[:2] == (2.0, pytest.approx(np.sqrt(2)))


@pytest.mark.parametrize(
    "values",
    [[1.0, 2.0, 3.0], [-36.0, 12.0, 60.0], [0.3, -0.1], [5.0, 4.0, 6.5, 5.5, 4.2, 7.7, 3.3]],
)
def test_t_test_p_matches_scipy(values):
    assert stats.t_test_p(values) == pytest.approx(scipy_stats.ttest_1samp(values, 0).pvalue)


def test_t_test_p_edge_cases():
    assert np.isnan(stats.t_test_p([3.0]))
    assert stats.t_test_p([0.0, 0.0, 0.0]) == 1.0  # scipy: NaN; no difference at all
    assert stats.t_test_p([24.0, 24.0]) == 0.0  # as scipy: t is infinite


def test_projected_p_is_the_t_test_of_values_with_that_mean_and_spread():
    # 1, 2, 3: mean 2, sd 1, so at n = 3 the projection is the test of those values; the same
    # mean and sd at n = 6 are the values 0.5 .. 3.5 scaled to sd 1 (scipy on real values).
    assert stats.projected_p(2.0, 1.0, 3) == pytest.approx(stats.t_test_p([1.0, 2.0, 3.0]))
    six = np.array([0.5, 1.0, 1.5, 2.5, 3.0, 3.5])
    six = 2.0 + (six - six.mean()) / six.std(ddof=1)
    assert stats.projected_p(2.0, 1.0, 6) == pytest.approx(scipy_stats.ttest_1samp(six, 0).pvalue)
    assert np.isnan(stats.projected_p(2.0, 1.0, 1)) and np.isnan(stats.projected_p(np.nan, 1, 5))
    assert stats.projected_p(3.0, 0.0, 4) == 0.0 and stats.projected_p(0.0, 0.0, 4) == 1.0


def test_holm_by_hand():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> running max 0.06
    adjusted = stats.adjust_pvalues([0.01, 0.04, 0.03, 0.005], "holm")
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # NaN is not a member: m = 2
    adjusted = stats.adjust_pvalues([0.01, np.nan, 0.04])
    assert adjusted[[0, 2]] == pytest.approx([0.02, 0.04]) and np.isnan(adjusted[1])
    assert stats.adjust_pvalues([0.5, 0.6], "holm") == pytest.approx([1.0, 1.0])  # capped
    assert stats.adjust_pvalues([0.02, 0.02], "holm") == pytest.approx([0.04, 0.04])  # ties


def test_benjamini_hochberg_by_hand():
    # sorted: 0.005*4/1 = 0.02, 0.01*4/2 = 0.02, 0.03*4/3 = 0.04, 0.04*4/4 = 0.04
    adjusted = stats.adjust_pvalues([0.01, 0.04, 0.03, 0.005], "bh")
    assert adjusted == pytest.approx([0.02, 0.04, 0.04, 0.02])
    # 0.5*2/1 = 1.0, 0.6*2/2 = 0.6 -> running min from the top: 0.6, 0.6
    assert stats.adjust_pvalues([0.5, 0.6], "bh") == pytest.approx([0.6, 0.6])
    # 0.01*3 = 0.03, 0.02*3/2 = 0.03, 0.9*3/3 = 0.9
    assert stats.adjust_pvalues([0.9, np.nan, 0.02, 0.01], "bh")[[0, 2, 3]] == pytest.approx(
        [0.9, 0.03, 0.03]
    )


def test_adjust_pvalues_empty_family_and_bad_method():
    assert np.isnan(stats.adjust_pvalues([np.nan, np.nan])).all()
    assert stats.adjust_pvalues([]).shape == (0,)
    with pytest.raises(ValueError, match="correction 'bonferroni'"):
        stats.adjust_pvalues([0.1], "bonferroni")


def ranks_of(t2i, i2t, text_to_image) -> dict[str, np.ndarray]:
    return {
        "t2i_rank": np.asarray(t2i, dtype=np.int64),
        "i2t_rank": np.asarray(i2t, dtype=np.int64),
        "text_to_image": np.asarray(text_to_image, dtype=np.int64),
    }


# 3 images; captions 0, 1 -> image 0; 2 -> image 1; 3, 4, 5 -> image 2
SMALL = ranks_of([0, 6, 3, 0, 12, 1], [2, 0, 9], [0, 0, 1, 2, 2, 2])
# The same ranks with ties (trainers.recall): a caption tied with t other images behind its
# rank; an image's best own caption(s) (own of them) tied with t captions of other images.
TIED = {
    **SMALL,
    "t2i_ties": np.array([1, 0, 3, 0, 0, 4]),
    "i2t_ties": np.array([0, 5, 2]),
    "i2t_own": np.array([2, 1, 2]),
}


def test_recalls_from_ranks_by_hand():
    got = stats.recalls_from_ranks(SMALL)
    # t2i ranks 0, 6, 3, 0, 12, 1: < 1: 2 of 6; < 5: 4 of 6; < 10: 5 of 6
    # i2t ranks 2, 0, 9: < 1: 1 of 3; < 5: 2 of 3; < 10: 3 of 3
    expected = {"t2i_R1": 100 / 3, "t2i_R5": 200 / 3, "t2i_R10": 500 / 6,
                "i2t_R1": 100 / 3, "i2t_R5": 200 / 3, "i2t_R10": 100.0}  # fmt: skip
    for name, value in expected.items():
        assert got[name] == pytest.approx(value)
    assert got["rsum"] == pytest.approx(sum(expected.values()))
    assert got["mean_recall"] == pytest.approx(sum(expected.values()) / 6)


def test_recalls_from_ranks_with_ties_by_hand():
    got = stats.recalls_from_ranks(TIED)
    # t2i, clip((K - rank) / (ties + 1), 0, 1) per caption at K = 1, 5, 10:
    #   c0 rank 0 ties 1: 1/2, 1, 1     c1 rank 6: 0, 0, 1     c2 rank 3 ties 3: 0, 2/4, 1
    #   c3 rank 0: 1, 1, 1              c4 rank 12: 0, 0, 0    c5 rank 1 ties 4: 0, 4/5, 1
    # i2t, 1 - C(ties + own - j, own) / C(ties + own, own) with j = K - rank:
    #   img0 rank 2 (no tie): 0, 1, 1   img1 rank 0 ties 5 own 1: 1/6, 5/6, 1
    #   img2 rank 9 ties 2 own 2: 0, 0, 1 - C(3, 2) / C(4, 2) = 1/2
    expected = {"t2i_R1": 100 * 1.5 / 6, "t2i_R5": 100 * 3.3 / 6, "t2i_R10": 100 * 5 / 6,
                "i2t_R1": 100 / 18, "i2t_R5": 100 * 11 / 18, "i2t_R10": 100 * 2.5 / 3}  # fmt: skip
    assert got == pytest.approx(
        {**expected, "rsum": sum(expected.values()), "mean_recall": sum(expected.values()) / 6}
    )
    # Tie arrays of zeros (and own 1) are what a file without them means.
    none = {**SMALL, "t2i_ties": np.zeros(6, int), "i2t_ties": np.zeros(3, int),
            "i2t_own": np.ones(3, int)}  # fmt: skip
    assert stats.recalls_from_ranks(none) == stats.recalls_from_ranks(SMALL)


def test_check_ranks_names_the_problem():
    assert stats.check_ranks(SMALL) is None
    assert stats.check_ranks({"t2i_rank": SMALL["t2i_rank"]}) == "missing i2t_rank, text_to_image"
    assert "1-D integer" in stats.check_ranks({**SMALL, "i2t_rank": np.array([0.5, 1.0, 2.0])})
    assert "ids for 5 captions" in stats.check_ranks({**SMALL, "t2i_rank": np.arange(5)})
    assert "outside [0, 3)" in stats.check_ranks({**SMALL, "text_to_image": np.arange(6)})
    no_caption = {**SMALL, "text_to_image": np.array([0, 0, 0, 2, 2, 2])}
    assert stats.check_ranks(no_caption) == "an image has no caption"
    assert stats.check_ranks(TIED) is None
    assert "i2t_ties has 2 entries" in stats.check_ranks({**TIED, "i2t_ties": np.array([0, 1])})
    assert "t2i_ties: expected a 1-D integer" in stats.check_ranks(
        {**TIED, "t2i_ties": np.zeros(6)}
    )
    assert stats.check_ranks({**TIED, "t2i_ties": -np.ones(6, int)}) == (
        "t2i_ties: expected values >= 0, got -1"
    )
    assert "i2t_own: expected values >= 1" in stats.check_ranks(
        {**TIED, "i2t_own": np.zeros(3, int)}
    )
    # Image 1 has one caption: two own captions at its best score cannot be.
    assert "more own captions" in stats.check_ranks({**TIED, "i2t_own": np.array([1, 2, 1])})
    assert stats.eval_set_id(SMALL).startswith("3 images, 6 captions, id ")
    assert stats.eval_set_id(SMALL) != stats.eval_set_id(no_caption)


def test_bootstrap_indices_are_seeded_and_in_range():
    a = stats.bootstrap_indices(5, 40, seed=3)
    assert a.shape == (40, 5) and a.dtype == np.int64 and a.min() >= 0 and a.max() <= 4
    assert np.array_equal(a, stats.bootstrap_indices(5, 40, seed=3))
    assert not np.array_equal(a, stats.bootstrap_indices(5, 40, seed=4))


def _hit(ranks, direction: str, query: int, k: int) -> float:
    """A query's hit at k: 1 - (ways to fill the j = k - rank free tied places with items
    that are not its own) / (ways to fill them), ties and own from ``ranks`` or 0 and 1."""
    rank = int(ranks[f"{direction}_rank"][query])
    ties = int(ranks[f"{direction}_ties"][query]) if f"{direction}_ties" in ranks else 0
    own = int(ranks["i2t_own"][query]) if direction == "i2t" and "i2t_own" in ranks else 1
    j = min(max(k - rank, 0), ties + own)
    return 1 - comb(ties, j) / comb(ties + own, j)


def _loop_recalls(ranks, indices, ks=(1, 5, 10)) -> dict[str, np.ndarray]:
    """The slow, obvious bootstrap: per resample, list the drawn images' captions one by one."""
    captions_of = {i: [] for i in range(len(ranks["i2t_rank"]))}
    for caption, image in enumerate(ranks["text_to_image"]):
        captions_of[int(image)].append(caption)
    out: dict[str, list[float]] = {}
    for row in indices:
        captions = [c for image in row for c in captions_of[int(image)]]
        total = 0.0
        for k in ks:
            value = 100.0 * sum(_hit(ranks, "t2i", c, k) for c in captions) / len(captions)
            out.setdefault(f"t2i_R{k}", []).append(value)
            total += value
        for k in ks:
            value = 100.0 * sum(_hit(ranks, "i2t", int(i), k) for i in row) / len(row)
            out.setdefault(f"i2t_R{k}", []).append(value)
            total += value
        out.setdefault("rsum", []).append(total)
        out.setdefault("mean_recall", []).append(total / 6)
    return {name: np.array(values) for name, values in out.items()}


def test_bootstrap_matches_a_direct_loop_on_hand_made_ranks():
    indices = stats.bootstrap_indices(3, 60, seed=11)
    fast = stats.QueryBootstrap(indices).recalls(SMALL)
    slow = _loop_recalls(SMALL, indices)
    assert set(fast) == set(stats.RANK_METRICS)
    for name in stats.RANK_METRICS:
        np.testing.assert_allclose(fast[name], slow[name], rtol=0, atol=1e-9)
    # A resample that draws every image once gives the point estimate.
    whole = stats.QueryBootstrap(np.array([[0, 1, 2], [2, 1, 0]])).recalls(SMALL)
    assert whole["rsum"] == pytest.approx([stats.recalls_from_ranks(SMALL)["rsum"]] * 2)
    # Image 2 drawn three times: its 3 captions count 3 times (9 of 9 captions).
    only_2 = stats.QueryBootstrap(np.array([[2, 2, 2]])).recalls(SMALL)
    assert only_2["t2i_R1"] == pytest.approx([100 * 3 / 9])  # ranks 0, 12, 1 -> one hit each
    assert only_2["i2t_R10"] == pytest.approx([100.0])


def test_bootstrap_matches_the_loop_on_random_ranks():
    rng = np.random.default_rng(5)
    n_img = 9
    ids = np.concatenate([np.arange(n_img), rng.integers(0, n_img, 13)])
    ranks = ranks_of(rng.integers(0, 12, ids.size), rng.integers(0, 25, n_img), ids)
    indices = stats.bootstrap_indices(n_img, 80, seed=2)
    draw = stats.QueryBootstrap(indices)
    slow = _loop_recalls(ranks, indices)
    for name in stats.RANK_METRICS:
        np.testing.assert_allclose(draw.metric(ranks, name), slow[name], atol=1e-9)
    with pytest.raises(KeyError, match="loss is not computable"):
        draw.metric(ranks, "loss")
    with pytest.raises(ValueError, match="3 images, the draw has 9"):
        draw.recalls(SMALL)


def test_bootstrap_scores_ties_as_their_expected_hits():
    indices = stats.bootstrap_indices(3, 60, seed=11)
    fast = stats.QueryBootstrap(indices).recalls(TIED)
    slow = _loop_recalls(TIED, indices)
    for name in stats.RANK_METRICS:
        np.testing.assert_allclose(fast[name], slow[name], rtol=0, atol=1e-9)
    # A resample that draws every image once is the whole set: recalls_from_ranks, ties and all.
    whole = stats.QueryBootstrap(np.array([[0, 1, 2], [2, 1, 0]])).recalls(TIED)
    point = stats.recalls_from_ranks(TIED)
    for name in stats.RANK_METRICS:
        np.testing.assert_allclose(whole[name], [point[name]] * 2, rtol=1e-13, atol=0)
    assert point["i2t_R1"] == pytest.approx(100 / 18)  # not 1/3: the ties cost it
    # Random ranks and ties on a bigger set, against the loop.
    rng = np.random.default_rng(8)
    n_img = 9
    ids = np.concatenate([np.arange(n_img), rng.integers(0, n_img, 13)])
    ranks = {
        **ranks_of(rng.integers(0, 12, ids.size), rng.integers(0, 25, n_img), ids),
        "t2i_ties": rng.integers(0, 6, ids.size),
        "i2t_ties": rng.integers(0, 6, n_img),
        "i2t_own": rng.integers(1, np.bincount(ids) + 1),
    }
    draw = stats.QueryBootstrap(stats.bootstrap_indices(n_img, 80, seed=2))
    slow = _loop_recalls(ranks, stats.bootstrap_indices(n_img, 80, seed=2))
    for name in stats.RANK_METRICS:
        np.testing.assert_allclose(draw.metric(ranks, name), slow[name], atol=1e-9)


def test_bootstrap_p_by_hand():
    # #{g <= 0} = 1 -> 2/5; #{g >= 0} = 3 -> 4/5; p = 2 * 0.4
    assert stats.bootstrap_p([1.0, 2.0, 3.0, -1.0]) == pytest.approx(0.8)
    assert stats.bootstrap_p(np.arange(1.0, 10.0)) == pytest.approx(2 * 1 / 10)
    assert stats.bootstrap_p(np.zeros(7)) == 1.0
    assert np.isnan(stats.bootstrap_p([]))


def test_identical_runs_give_a_zero_gain_interval_and_p_one():
    draw = stats.QueryBootstrap(stats.bootstrap_indices(3, 500))
    gains = draw.metric(SMALL, "rsum") - draw.metric(dict(SMALL), "rsum")
    assert stats.percentile_interval(gains) == (0.0, 0.0)
    assert stats.bootstrap_p(gains) == 1.0


def test_percentile_interval():
    assert stats.percentile_interval(np.arange(101.0)) == pytest.approx((2.5, 97.5))
    assert stats.percentile_interval(np.arange(101.0), 0.5) == pytest.approx((25.0, 75.0))
    assert np.isnan(stats.percentile_interval([])).all()
