"""Retrieval recall: hand-counted cases, the tie rule (expected hits under a random order of
ties), eval folds, chunking, dtypes, batched encoding."""

from __future__ import annotations

import re
from fractions import Fraction
from math import comb

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainers.errors import InputError
from trainers.evaluate import (
    QueryRanks,
    encode_batches,
    evaluate_retrieval,
    metric_keys,
    metrics_from_ranks,
    retrieval_metrics,
    retrieval_ranks,
    tie_tolerance,
)

# --- hand-counted case -------------------------------------------------------------------------
# Images are the one-hot rows of I_4, so score(caption j, image i) is exactly TEXT[j][i] in any
# float format, and equal literals tie exactly. Captions are deliberately not grouped by image.
HAND_TEXT = [
    [0.48, 0.64, 0.60, 0.00],  # c0 -> img3: own 0.00 < 0.48, 0.64, 0.60        t2i rank 3
    [0.20, 0.40, 0.40, 0.80],  # c1 -> img0: own 0.20 < 0.40, 0.40, 0.80        t2i rank 3
    [0.00, 0.60, 0.80, 0.00],  # c2 -> img1: own 0.60 < 0.80                    t2i rank 1
    [1.00, 0.00, 0.00, 0.00],  # c3 -> img0: own 1.00 is the top                t2i rank 0
    [0.00, 0.00, 0.80, 0.60],  # c4 -> img2: own 0.80 is the top                t2i rank 0
    [0.80, 0.60, 0.00, 0.00],  # c5 -> img1: own 0.60 < 0.80                    t2i rank 1
    [0.60, 0.80, 0.00, 0.00],  # c6 -> img0: own 0.60 < 0.80                    t2i rank 1
]
HAND_IDS = [3, 0, 1, 0, 2, 1, 0]
# No caption's own image ties another image: t2i ties are all 0.
# image->text, reading the columns (own captions starred); rank = other captions above the
# best own caption, ties = other captions equal to it, own = own captions equal to it:
#   img0: c0 .48, c1* .20, c2 0, c3* 1.0, c4 0, c5 .80, c6* .60 -> best 1.0: rank 0, ties 0
#   img1: c0 .64, c1 .40, c2* .60, c3 0, c4 0, c5* .60, c6 .80  -> best .60: rank 2, own 2
#   img2: c0 .60, c1 .40, c2 .80, c3 0, c4* .80, c5 0, c6 0     -> best .80: rank 0, ties 1
#   img3: c0* 0, c1 .80, c2 0, c3 0, c4 .60, c5 0, c6 0         -> best 0:   rank 2, ties 4
# t2i ranks [3, 3, 1, 0, 0, 1, 1]; i2t ranks [0, 2, 0, 2], ties [0, 0, 1, 4], own [1, 2, 1, 1].
# A tie no longer favours the true caption: img2's c4 shares the top with c2, so in a random
# order it is first half the time (R@1 0.5, was 1); img3's c0 is one of 5 captions at 0 behind
# 2 above, so at K = 3 it takes the one free place 1 time in 5 (R@3 0.2, was 1).
HAND_EXPECTED = {
    "t2i_R1": 100 * 2 / 7,  # c3, c4
    "t2i_R2": 100 * 5 / 7,  # + c2, c5, c6
    "t2i_R3": 100 * 5 / 7,  # rank 3 is not < 3
    "i2t_R1": 100 * 1.5 / 4,  # img0 1, img2 1/2
    "i2t_R2": 50.0,  # img0, img2; img1 and img3 have 2 captions above
    "i2t_R3": 100 * 3.2 / 4,  # img0, img1, img2 1, img3 1/5
}
HAND_RANKS = {
    "t2i_rank": [3, 3, 1, 0, 0, 1, 1],
    "t2i_ties": [0] * 7,
    "i2t_rank": [0, 2, 0, 2],
    "i2t_ties": [0, 0, 1, 4],
    "i2t_own": [1, 2, 1, 1],
}


def hand_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.eye(4), torch.tensor(HAND_TEXT), torch.tensor(HAND_IDS)


def with_sums(recalls: dict[str, float]) -> dict[str, float]:
    rsum = sum(recalls.values())
    return {**recalls, "rsum": rsum, "mean_recall": rsum / len(recalls)}


def assert_metrics(actual: dict[str, float], expected: dict[str, float]) -> None:
    assert list(actual) == list(expected)
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, abs=1e-9), key


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 1024])
def test_hand_counted_multi_caption(chunk_size: int) -> None:
    image, text, ids = hand_case()
    metrics = retrieval_metrics(image, text, ids, ks=(1, 2, 3), chunk_size=chunk_size)
    assert_metrics(metrics, with_sums(HAND_EXPECTED))
    assert metrics["rsum"] == pytest.approx(167.5 + 1200 / 7)


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_hand_counted_per_query_ranks(chunk_size: int) -> None:
    image, text, ids = hand_case()
    ranks = retrieval_ranks(image, text, ids, chunk_size=chunk_size)
    assert {name: value.tolist() for name, value in ranks.tensors().items()} == HAND_RANKS
    assert all(v.dtype == torch.long and v.device.type == "cpu" for v in ranks.tensors().values())
    assert_metrics(metrics_from_ranks(ranks, ks=(1, 2, 3)), with_sums(HAND_EXPECTED))


def test_evaluate_retrieval_hands_out_the_ranks_behind_its_recalls() -> None:
    image, text, ids = hand_case()
    ranks: dict[str, torch.Tensor] = {}
    metrics = evaluate_retrieval(
        lambda x: x, lambda t: t, image, text, ids, batch_size=2, ks=(1, 2, 3), ranks_out=ranks
    )
    assert {name: value.tolist() for name, value in ranks.items()} == HAND_RANKS
    assert_metrics(metrics, with_sums(HAND_EXPECTED))


def test_ranks_of_a_file_without_tie_arrays_read_as_no_ties() -> None:
    # eval_ranks.npz of runs before ties were counted hold t2i_rank and i2t_rank only.
    old = {"t2i_rank": np.array([0, 2]), "i2t_rank": np.array([1]), "text_to_image": [0, 0]}
    ranks = QueryRanks.from_arrays(old)
    assert ranks.t2i_ties.tolist() == [0, 0] and ranks.i2t_ties.tolist() == [0]
    assert ranks.i2t_own.tolist() == [1] and ranks.t2i_rank.dtype == torch.long
    assert metrics_from_ranks(ranks, ks=(1, 2))["t2i_R1"] == 50.0
    again = QueryRanks.from_arrays(ranks.tensors())
    assert again.arrays().keys() == ranks.arrays().keys()
    assert all((again.arrays()[k] == v).all() for k, v in ranks.arrays().items())


def test_k_larger_than_n_counts_every_match() -> None:
    # 4 images and 7 captions: K = 5 and 10 exceed N_img, K = 10 exceeds N_txt; R@1 as above.
    # i2t_R5: img3's c0 is one of 5 tied captions behind 2, so it gets 3 of the 5 places
    # (3/5; every other image hits), which the old tie rule counted as a hit.
    image, text, ids = hand_case()
    metrics = retrieval_metrics(image, text, ids)
    expected = {
        "t2i_R1": 100 * 2 / 7,
        "t2i_R5": 100.0,
        "t2i_R10": 100.0,
        "i2t_R1": 37.5,
        "i2t_R5": 100 * 3.6 / 4,
        "i2t_R10": 100.0,
    }
    assert_metrics(metrics, with_sums(expected))
    assert list(metrics) == metric_keys()


def test_a_duplicate_image_splits_the_top_place_with_its_twin() -> None:
    # img0 and img1 are the same vector; c0 -> img0 and c1 -> img1 both score 1.0 against both.
    # The old rule (strictly greater scores only) gave both rank 0, t2i_R1 = 100: a tie
    # favoured the true match. In a random order of the twins each is first half the time.
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.6, 0.8]])  # c2 -> img2: .6, .6, .8 rank 0
    ids = torch.tensor([0, 1, 2])
    # i2t columns: img0 [1*, 1, .6] and img1 [1, 1*, .6] tie their own caption with the
    # twin's: 1/2 each; img2 [0, 0, .8*]: 1.
    metrics = retrieval_metrics(image, text, ids, ks=(1, 2))
    expected = {"t2i_R1": 200 / 3, "t2i_R2": 100.0, "i2t_R1": 200 / 3, "i2t_R2": 100.0}
    assert_metrics(metrics, with_sums(expected))


def test_ties_below_the_top_share_the_places_they_take() -> None:
    # One-hot images in 5-d. c0 -> img3 scores [.4, .4, .4, .4*, .6]: .6 is above (rank 1) and
    # img0-img2 tie with its own image (ties 3), so it holds 1 of the 4 places behind .6 at
    # random: R@1 0, R@2 1/4 (the old rule, strictly greater only, gave R@2 = 1).
    # c1..c4 are e0, e1, e2, e4 -> rank 0. t2i_R1 = 4/5, t2i_R2 = (4 + 1/4) / 5.
    # i2t: img3's column is [.4*, 0, 0, 0, 0] -> rank 0; img0 [.4, 1*, 0, 0, 0] -> rank 0;
    # likewise img1, img2, img4 -> rank 0.
    image = torch.eye(5)
    text = torch.tensor(
        [
            [0.4, 0.4, 0.4, 0.4, 0.6],
            [1.0, 0.0, 0.0, 0.0, 0.0],
            [0.0, 1.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 1.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0, 1.0],
        ]
    )
    ids = torch.tensor([3, 0, 1, 2, 4])
    metrics = retrieval_metrics(image, text, ids, ks=(1, 2))
    expected = {"t2i_R1": 80.0, "t2i_R2": 85.0, "i2t_R1": 100.0, "i2t_R2": 100.0}
    assert_metrics(metrics, with_sums(expected))


def test_a_caption_repeated_for_two_images_ties_in_both_of_their_columns() -> None:
    # One-hot images in 4-d. u = (.6, .8, 0, 0) is the caption of img0 (c0) and twice of img1
    # (c1, c4); w = (.28, 0, .96, 0) -> img0; e2 -> img2.
    u, w, e2 = [0.6, 0.8, 0.0, 0.0], [0.28, 0.0, 0.96, 0.0], [0.0, 0.0, 1.0, 0.0]
    image = torch.eye(4)[:3]
    text = torch.tensor([u, u, w, e2, u])
    ids = torch.tensor([0, 1, 0, 2, 1])
    # t2i rows: c0 [.6*, .8, 0] rank 1; c1, c4 [.6, .8*, 0] rank 0; c2 [.28*, 0, .96] rank 1;
    # c3 [0, 0, 1*] rank 0. No t2i ties: R@1 3/5, R@2 and R@3 1.
    # i2t columns: img0 [c0* .6, c1 .6, c2* .28, c3 0, c4 .6]: its best (c0) ties img1's two
    # copies, a random order of 3 puts it at each place with 1/3: R@1 1/3, R@2 2/3, R@3 1.
    # img1 [c0 .8, c1* .8, c2 0, c3 0, c4* .8]: two own copies and img0's one: the first of the
    # 3 is its own with 2/3 (1 - C(2, 2) / C(3, 2)), R@2 1. img2: c3* 1 on top, 1.
    ranks = retrieval_ranks(image, text, ids)
    assert ranks.i2t_rank.tolist() == [0, 0, 0] and ranks.i2t_ties.tolist() == [2, 1, 0]
    assert ranks.i2t_own.tolist() == [1, 2, 1] and ranks.t2i_ties.tolist() == [0] * 5
    metrics = retrieval_metrics(image, text, ids, ks=(1, 2, 3))
    expected = {
        "t2i_R1": 60.0,
        "t2i_R2": 100.0,
        "t2i_R3": 100.0,
        "i2t_R1": 100 * (1 / 3 + 2 / 3 + 1) / 3,
        "i2t_R2": 100 * (2 / 3 + 1 + 1) / 3,
        "i2t_R3": 100.0,
    }
    assert_metrics(metrics, with_sums(expected))


# --- towers that ignore their input score chance -------------------------------------------------
N_CONST, CAPTIONS_CONST, KS_CONST = 6, 3, (1, 2, 5)


def constant_tower_case(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """6 distinct random images in 64-d with 3 captions each (ids interleaved), and 18 distinct
    random captions."""
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(N_CONST, 64, generator=gen), dim=1)
    text = F.normalize(torch.randn(N_CONST * CAPTIONS_CONST, 64, generator=gen), dim=1)
    ids = torch.arange(N_CONST).repeat(CAPTIONS_CONST)
    return image, text, ids


def noisy_copies(n: int, seed: int) -> torch.Tensor:
    """``n`` rows that are one direction renormalised from different lengths: equal in exact
    arithmetic, off by float32 rounding in the last bits."""
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(1, 64, generator=gen)
    scales = torch.logspace(-3, 3, n)[:, None]
    return F.normalize(direction * scales, dim=1)


def chance_i2t(k: int) -> float:
    """i2t R@K of an image whose 3 captions tie all 18: the chance that a random order of 18
    puts one of its 3 in the first k places."""
    n = N_CONST * CAPTIONS_CONST
    return 100 * (1 - comb(n - k, CAPTIONS_CONST) / comb(n, CAPTIONS_CONST))


@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_a_constant_text_tower_scores_chance(chunk_size: int) -> None:
    # Every caption is one vector (up to float noise): each image's 3 captions tie all 18, and
    # a caption ranks the images in one fixed order, so the captions of the image at place p
    # have rank p: ranks 0..5, each 3 times, t2i R@K = K / 6 with no tie at all. The old rule
    # gave i2t R@K = 100 for every K.
    image, _, ids = constant_tower_case()
    text = noisy_copies(len(ids), seed=1)
    assert (text != text[0]).any(), "the copies should differ by rounding"
    metrics = retrieval_metrics(image, text, ids, ks=KS_CONST, chunk_size=chunk_size)
    expected = {f"t2i_R{k}": 100 * k / N_CONST for k in KS_CONST}
    expected |= {f"i2t_R{k}": chance_i2t(k) for k in KS_CONST}
    assert_metrics(metrics, with_sums(expected))
    assert metrics["i2t_R1"] == pytest.approx(100 / 6)  # 1 - 15/18 * 14/17 * 13/16


@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_a_constant_image_tower_scores_chance(chunk_size: int) -> None:
    # Every image is one vector (up to float noise): each caption ties its image with all 6,
    # t2i R@K = K / 6. Every image ranks the captions in the same order, so an image hits at K
    # exactly when one of its captions is among that order's first K: i2t R@K is the share of
    # images owning one of the top K captions, at most K / 6.
    _, text, ids = constant_tower_case()
    image = noisy_copies(N_CONST, seed=2)
    metrics = retrieval_metrics(image, text, ids, ks=KS_CONST, chunk_size=chunk_size)
    order = torch.argsort(text.double() @ image[0].double(), descending=True)
    expected = {f"t2i_R{k}": 100 * k / N_CONST for k in KS_CONST}
    for k in KS_CONST:
        owners = {int(ids[c]) for c in order[:k]}
        expected[f"i2t_R{k}"] = 100 * len(owners) / N_CONST
        assert expected[f"i2t_R{k}"] <= 100 * k / N_CONST
    assert_metrics(metrics, with_sums(expected))


def test_the_tie_band_is_the_float32_error_of_a_d_term_dot_product() -> None:
    assert tie_tolerance(1) == 2.0**-23
    assert tie_tolerance(512) == 512 * 2.0**-23
    # Two scores just inside the band tie; just outside, they are ordered. With one-hot
    # images the scores are the caption's entries: a = 0.6 and b = a + 7 or 9 float32 steps
    # of 2^-24 (the band at d = 4 is 2^-21, 8 steps).
    d, a = 4, 0.6
    image = torch.eye(d)[:2]
    for steps, ties in ((7, 1), (9, 0)):
        b = float(torch.tensor(a, dtype=torch.float32)) + steps * 2.0**-24
        rest = (1 - a * a - b * b) ** 0.5  # unit row; its own entry scores no image
        text = torch.tensor([[a, b, rest, 0.0], [0.0, 0.0, 0.0, 1.0]])
        ranks = retrieval_ranks(image, text, torch.tensor([0, 1]))
        assert (ranks.t2i_rank[0].item(), ranks.t2i_ties[0].item()) == (1 - ties, ties)


# --- eval folds ------------------------------------------------------------------------------
def test_hand_counted_ranks_within_folds_of_two() -> None:
    # Fold A = img0, img1 with c1, c2, c3, c5, c6; fold B = img2, img3 with c0, c4. Each query
    # now meets only its own fold (scores from HAND_TEXT's first or last two columns):
    #   t2i: c0 -> img3 [.60, 0*] 1; c1 -> img0 [.20*, .40] 1; c2 -> img1 [0, .60*] 0;
    #        c3 -> img0 [1*, 0] 0; c4 -> img2 [.80*, .60] 0; c5 [.80, .60*] 1; c6 [.60*, .80] 1
    #   i2t: img0 [c1* .2, c2 0, c3* 1, c5 .8, c6* .6] 0; img1 [.4, .6*, 0, .6*, .8] 1, own 2;
    #        img2 [c0 .6, c4* .8] 0; img3 [c0* 0, c4 .6] 1.
    image, text, ids = hand_case()
    ranks = retrieval_ranks(image, text, ids, chunk_size=2, fold_size=2)
    assert ranks.t2i_rank.tolist() == [1, 1, 0, 0, 0, 1, 1]
    assert ranks.i2t_rank.tolist() == [0, 1, 0, 1] and ranks.i2t_own.tolist() == [1, 2, 1, 1]
    assert ranks.t2i_ties.tolist() == [0] * 7 and ranks.i2t_ties.tolist() == [0] * 4


def two_captions_each(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """4 random images with 2 noisy captions each, captions in shuffled order (no ties)."""
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(4, 8, generator=gen), dim=1)
    ids = torch.tensor([3, 0, 2, 1, 1, 0, 3, 2])
    text = F.normalize(image[ids] + 0.8 * torch.randn(8, 8, generator=gen), dim=1)
    return image, text, ids


@pytest.mark.parametrize("seed", range(4))
def test_folds_of_two_are_the_mean_of_the_halves_scored_alone(seed: int) -> None:
    image, text, ids = two_captions_each(seed)
    ks = (1, 2, 3)
    folded = retrieval_metrics(image, text, ids, ks=ks, fold_size=2)
    halves = []
    for start in (0, 2):
        mine = (ids >= start) & (ids < start + 2)
        halves.append(
            retrieval_metrics(image[start : start + 2], text[mine], ids[mine] - start, ks=ks)
        )
    assert_metrics(folded, {key: (halves[0][key] + halves[1][key]) / 2 for key in folded})


def test_a_fold_as_big_as_the_set_scores_it_whole() -> None:
    image, text, ids = two_captions_each(0)
    whole = retrieval_metrics(image, text, ids)
    assert retrieval_metrics(image, text, ids, fold_size=4) == whole
    assert retrieval_metrics(image, text, ids, fold_size=1000) == whole
    assert retrieval_metrics(image, text, ids, fold_size=None) == whole
    assert retrieval_metrics(image, text, ids, fold_size=1) != whole  # one image: all hits
    assert retrieval_metrics(image, text, ids, fold_size=1)["rsum"] == 600.0


def test_a_set_that_does_not_split_into_whole_folds_is_refused() -> None:
    image, text, ids = hand_case()
    with pytest.raises(InputError, match=r"^fold_size: expected an eval set of a multiple of 3 "
                       r"images \(or at most 3\).*got 4 images") as error:  # fmt: skip
        retrieval_metrics(image, text, ids, fold_size=3)
    assert "\n" not in str(error.value)
    with pytest.raises(InputError, match="fold_size: expected a positive int"):
        retrieval_metrics(image, text, ids, fold_size=0)
    calls: list[int] = []

    def encode(batch: torch.Tensor) -> torch.Tensor:
        calls.append(len(batch))
        return batch.flatten(1)

    with pytest.raises(InputError, match="multiple of 3 images"):
        evaluate_retrieval(encode, encode, image, text, ids, fold_size=3)
    assert calls == []  # refused before any encoding


# --- independent brute-force reference -----------------------------------------------------------
def reference_metrics(
    image: np.ndarray, text: np.ndarray, ids: np.ndarray, ks: tuple[int, ...]
) -> dict[str, float]:
    """Full float64 score matrix; a query's items within the tie band of its true score are
    ordered uniformly at random. A query hits at K when one of its ``own`` true items lands in
    the first ``j = K - above`` of the ``tied + own`` items of the band: 1 - (the number of
    ways to fill those j places with other items only) / (the ways to fill them at all)."""
    scores = text.astype(np.float64) @ image.astype(np.float64).T
    tol = tie_tolerance(image.shape[1])

    def hit(values: np.ndarray, is_true: np.ndarray, k: int) -> Fraction:
        top = values[is_true].max()
        above = int(np.sum(values > top + tol))
        band = np.abs(values - top) <= tol
        own, tied = int(np.sum(band & is_true)), int(np.sum(band & ~is_true))
        j = min(max(k - above, 0), tied + own)
        return 1 - Fraction(comb(tied, j), comb(tied + own, j))

    recalls = {}
    for k in ks:
        hits = [hit(row, np.arange(len(row)) == ids[c], k) for c, row in enumerate(scores)]
        recalls[f"t2i_R{k}"] = float(100 * sum(hits) / len(hits))
    for k in ks:
        hits = [hit(column, ids == i, k) for i, column in enumerate(scores.T)]
        recalls[f"i2t_R{k}"] = float(100 * sum(hits) / len(hits))
    return with_sums(recalls)


def random_ids(rng: np.random.Generator, n_img: int, max_captions: int) -> np.ndarray:
    """Every image gets 1..max_captions captions, in shuffled order."""
    ids = np.repeat(np.arange(n_img), rng.integers(1, max_captions + 1, size=n_img))
    return rng.permutation(ids)


def half_grid_vectors(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """Unit vectors with entries in {0, +-1/2, +-1}: every dot product is a multiple of 1/4,
    exact in any float format, so ties are frequent and exact."""
    out = np.zeros((n, d))
    for row in out:
        if rng.random() < 0.3:
            row[rng.integers(d)] = rng.choice([-1.0, 1.0])
        else:
            row[rng.choice(d, size=4, replace=False)] = rng.choice([-0.5, 0.5], size=4)
    return out


@pytest.mark.parametrize("seed", range(8))
def test_matches_a_random_tie_order_reference_with_exact_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_img = int(rng.integers(1, 15))
    ids = random_ids(rng, n_img, max_captions=4)
    image = half_grid_vectors(rng, n_img, d=6)
    text = half_grid_vectors(rng, len(ids), d=6)
    ks = (1, 2, 5)
    expected = reference_metrics(image, text, ids, ks)
    actual = retrieval_metrics(
        torch.tensor(image, dtype=torch.float32),
        torch.tensor(text, dtype=torch.float32),
        torch.tensor(ids),
        ks=ks,
        chunk_size=int(rng.integers(1, 6)),
    )
    assert_metrics(actual, expected)


@pytest.mark.parametrize("seed", range(8))
def test_matches_the_reference_on_continuous_data(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    n_img = int(rng.integers(2, 40))
    ids = random_ids(rng, n_img, max_captions=5)
    d = int(rng.integers(2, 16))
    image = rng.standard_normal((n_img, d))
    text = image[ids] + rng.standard_normal((len(ids), d))  # noisy copies: recall in between
    image = (image / np.linalg.norm(image, axis=1, keepdims=True)).astype(np.float32)
    text = (text / np.linalg.norm(text, axis=1, keepdims=True)).astype(np.float32)
    ks = (1, 3, 10)
    expected = reference_metrics(image, text, ids, ks)
    actual = retrieval_metrics(
        torch.from_numpy(image), torch.from_numpy(text), torch.from_numpy(ids), ks=ks, chunk_size=7
    )
    assert_metrics(actual, expected)


# --- chunking at scale ---------------------------------------------------------------------------
def grid_retrieval_set(
    n_img: int, captions_per_image: int, d: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Captions are noisy copies of their image. Entries are rounded to multiples of 2^-10 (d<=64),
    so every dot product and partial sum is a multiple of 2^-20 below 2 in magnitude: exact in
    float32 whatever the summation order, hence identical for any chunking or BLAS kernel."""
    assert d <= 64
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n_img, d, generator=gen), dim=1)
    ids = torch.arange(n_img).repeat_interleave(captions_per_image)
    ids = ids[torch.randperm(len(ids), generator=gen)]
    text = F.normalize(image[ids] + 2.5 * torch.randn(len(ids), d, generator=gen) / d**0.5, dim=1)
    return torch.round(image * 1024) / 1024, torch.round(text * 1024) / 1024, ids


@pytest.mark.integration
def test_chunk_size_does_not_change_the_numbers_at_20000_by_4000() -> None:
    image, text, ids = grid_retrieval_set(n_img=4000, captions_per_image=5, d=64, seed=0)
    small = retrieval_metrics(image, text, ids, chunk_size=256)
    large = retrieval_metrics(image, text, ids, chunk_size=4096)
    assert small == large
    # Not a degenerate case where both are trivially 0 or 100.
    assert 5 < small["t2i_R1"] < 95 and 5 < small["i2t_R1"] < 95


def test_chunk_size_does_not_change_the_numbers_small() -> None:
    image, text, ids = grid_retrieval_set(n_img=120, captions_per_image=5, d=32, seed=1)
    results = [retrieval_metrics(image, text, ids, chunk_size=c) for c in (7, 50, 1000)]
    assert all(r == results[0] for r in results)
    assert 5 < results[0]["t2i_R1"] < 95 and 5 < results[0]["i2t_R1"] < 95
    expected = reference_metrics(image.numpy(), text.numpy(), ids.numpy(), (1, 5, 10))
    assert_metrics(results[0], expected)


def test_chunking_never_builds_the_full_score_matrix() -> None:
    # The largest single allocation is one image chunk's scores, 50 x N_txt float32 (500 kB);
    # the full N_txt x N_img matrix would be 5 MB, and a bool mask summed to long 1 MB.
    image, text, ids = grid_retrieval_set(n_img=500, captions_per_image=5, d=16, seed=2)
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        retrieval_metrics(image, text, ids, chunk_size=50)
    largest = max(event.self_cpu_memory_usage for event in prof.events())
    assert largest == 50 * 2500 * 4


# --- dtypes and devices --------------------------------------------------------------------------
def separated_set(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
    """5 images, 15 captions (1..5 per image) whose 75 scores are distinct multiples of ~0.012
    in [-0.44, 0.44], realised exactly by a random rotation: float16 rounding (< 1e-3 per score)
    cannot reorder any two of them. Returns image, text, ids and the designed score matrix."""
    rng = np.random.default_rng(seed)
    n_img, ids = 5, rng.permutation(np.repeat(np.arange(5), [1, 2, 3, 4, 5]))
    scores = rng.permutation(np.linspace(-0.44, 0.44, 75)).reshape(15, n_img)
    basis, _ = np.linalg.qr(rng.standard_normal((20, 20)))
    image = basis[:n_img]
    slack = np.sqrt(1 - (scores**2).sum(axis=1, keepdims=True))  # along a caption's own axis
    text = scores @ image + slack * basis[n_img:]
    return torch.tensor(image), torch.tensor(text), torch.tensor(ids), scores


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_low_precision_inputs_agree_on_well_separated_data(dtype: torch.dtype) -> None:
    image, text, ids, scores = separated_set()
    ks = (1, 2, 3)
    # The reference sees only the designed scores: one-hot "images" turn them into the matrix.
    expected = reference_metrics(np.eye(5), scores, ids.numpy(), ks)
    actual = retrieval_metrics(image.to(dtype), text.to(dtype), ids, ks=ks, chunk_size=4)
    assert_metrics(actual, expected)
    assert 0 < actual["t2i_R1"] < 100 and 0 < actual["i2t_R1"] < 100


def test_integer_id_dtypes_agree() -> None:
    image, text, ids = hand_case()
    assert retrieval_metrics(image, text, ids.int()) == retrieval_metrics(image, text, ids)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cuda_matches_cpu(dtype: torch.dtype) -> None:
    # Grid entries k / 1024 with |k| <= 1024 are exact in float16 too, so scores are exact on
    # both devices in both dtypes: the numbers must be identical.
    image, text, ids = grid_retrieval_set(n_img=2000, captions_per_image=5, d=64, seed=3)
    cpu = retrieval_metrics(image, text, ids, chunk_size=512)
    cuda = retrieval_metrics(image.cuda().to(dtype), text.cuda().to(dtype), ids.cuda())
    assert cuda == cpu
    image, text, ids, scores = separated_set(seed=1)
    expected = reference_metrics(np.eye(5), scores, ids.numpy(), (1, 2, 3))
    # ids stay on the CPU: retrieval_metrics moves them to the embeddings' device.
    actual = retrieval_metrics(image.cuda().to(dtype), text.cuda().to(dtype), ids, ks=(1, 2, 3))
    assert_metrics(actual, expected)


# --- validation ----------------------------------------------------------------------------------
def _bad_inputs() -> list[tuple[str, dict, str]]:
    image, text, ids = hand_case()
    return [
        ("1-d image", {"image_emb": image[0]}, "image_emb: expected a non-empty N x d"),
        ("empty text", {"text_emb": text[:0]}, "text_emb: expected a non-empty N x d"),
        ("int image", {"image_emb": torch.eye(4, dtype=torch.long)}, "floating-point"),
        ("width", {"text_emb": F.normalize(torch.ones(7, 3), dim=1)}, "expected width 4"),
        ("not unit", {"text_emb": text * 2}, "text_emb: expected L2-normalised rows"),
        ("nan", {"image_emb": torch.full((4, 4), float("nan"))}, "image_emb: expected L2-norm"),
        ("float ids", {"text_to_image": ids.float()}, "text_to_image: expected integer"),
        ("bool ids", {"text_to_image": ids > 0}, "text_to_image: expected integer"),
        ("short ids", {"text_to_image": ids[:6]}, "expected shape (7,)"),
        ("id too big", {"text_to_image": ids.clone().fill_(4)}, "ids in [0, 4), got values"),
        ("negative id", {"text_to_image": ids - 1}, "got values in [-1, 2]"),
        ("uncaptioned", {"text_to_image": torch.tensor([0, 0, 1, 0, 1, 1, 0])}, "2 of 4 have"),
        ("ks empty", {"ks": ()}, "ks: expected a non-empty"),
        ("ks zero", {"ks": (0, 1)}, "ks: expected a non-empty"),
        ("ks repeated", {"ks": (1, 1)}, "ks: expected distinct"),
        ("chunk zero", {"chunk_size": 0}, "chunk_size: expected a positive int"),
        ("too many rows", {"text_emb": torch.ones(2**24, 1)}, "expected at most 16777215 rows"),
    ]


@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda case: case[0])
def test_bad_input_is_refused_with_a_one_line_message(case: tuple[str, dict, str]) -> None:
    _, overrides, message = case
    image, text, ids = hand_case()
    kwargs = {"image_emb": image, "text_emb": text, "text_to_image": ids} | overrides
    with pytest.raises(InputError, match=re.escape(message)) as err:
        retrieval_metrics(**kwargs)
    assert "\n" not in str(err.value)


# --- batched encoding ----------------------------------------------------------------------------
def test_encode_batches_matches_one_independent_pass() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 3)
    inputs = torch.randn(10, 6)
    seen: list[int] = []

    def encode(batch: torch.Tensor) -> torch.Tensor:
        seen.append(len(batch))
        return linear(batch)

    out = encode_batches(encode, inputs, batch_size=4, device="cpu")
    weight, bias = linear.weight.detach().double(), linear.bias.detach().double()
    raw = inputs.double() @ weight.T + bias
    expected = raw / raw.norm(dim=1, keepdim=True)
    assert seen == [4, 4, 2]
    assert out.dtype == torch.float32 and out.device.type == "cpu" and not out.requires_grad
    torch.testing.assert_close(out.double(), expected, atol=1e-6, rtol=0)


def test_encode_batches_normalises_float16_without_overflow() -> None:
    # 300^2 * 4 = 360000 overflows float16 (max 65504) if the norm were taken in float16.
    out = encode_batches(lambda x: (x * 300).half(), torch.ones(3, 4), batch_size=2, device="cpu")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.full((3, 4), 0.5))


def test_encode_batches_refuses_a_wrong_output_shape() -> None:
    with pytest.raises(InputError, match="encode: expected a 2 x d output"):
        encode_batches(lambda x: x.sum(dim=1), torch.ones(2, 4), batch_size=8, device="cpu")
    with pytest.raises(InputError, match="batch_size: expected a positive int"):
        encode_batches(lambda x: x, torch.ones(2, 4), batch_size=0, device="cpu")


def test_evaluate_retrieval_reproduces_the_hand_counted_case() -> None:
    # "Images" are 2 x 2 pixel grids whose flattening is the one-hot image embedding; tokens are
    # one id per caption looked up in an embedding table that holds the caption vectors.
    images = torch.eye(4).reshape(4, 1, 2, 2) * 3.0  # unnormalised on purpose
    table = torch.nn.Embedding.from_pretrained(torch.tensor(HAND_TEXT) * 5.0)
    tokens = torch.arange(7)[:, None]
    metrics = evaluate_retrieval(
        lambda x: x.flatten(1),
        lambda t: table(t).mean(dim=1),
        images,
        tokens,
        torch.tensor(HAND_IDS),
        batch_size=3,
        ks=(1, 2, 3),
    )
    assert_metrics(metrics, with_sums(HAND_EXPECTED))


def test_evaluate_retrieval_checks_ids_before_encoding() -> None:
    calls: list[int] = []

    def encode(batch: torch.Tensor) -> torch.Tensor:
        calls.append(len(batch))
        return batch

    with pytest.raises(InputError, match="1 of 3 have none"):
        evaluate_retrieval(encode, encode, torch.eye(3), torch.eye(3), torch.tensor([0, 1, 1]))
    assert calls == []
