"""Retrieval recall: hand-counted cases, the tie rule, chunking, dtypes, batched encoding."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainers.errors import InputError
from trainers.evaluate import (
    encode_batches,
    evaluate_retrieval,
    metric_keys,
    metrics_from_ranks,
    retrieval_metrics,
    retrieval_ranks,
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
# image->text, reading the columns (own captions starred); rank = captions strictly above the
# best own caption:
#   img0: c0 .48, c1* .20, c2 0, c3* 1.0, c4 0, c5 .80, c6* .60 -> best 1.0, none above  rank 0
#   img1: c0 .64, c1 .40, c2* .60, c3 0, c4 0, c5* .60, c6 .80  -> best .60, c0 c6 above rank 2
#   img2: c0 .60, c1 .40, c2 .80, c3 0, c4* .80, c5 0, c6 0     -> best .80, c2 ties    rank 0
#   img3: c0* 0, c1 .80, c2 0, c3 0, c4 .60, c5 0, c6 0         -> best 0, c1 c4 above  rank 2
# t2i ranks [3, 3, 1, 0, 0, 1, 1]; i2t ranks [0, 2, 0, 2].
HAND_EXPECTED = {
    "t2i_R1": 100 * 2 / 7,  # c3, c4
    "t2i_R2": 100 * 5 / 7,  # + c2, c5, c6
    "t2i_R3": 100 * 5 / 7,  # rank 3 is not < 3
    "i2t_R1": 50.0,  # img0, img2 (the tie favours the true caption)
    "i2t_R2": 50.0,  # rank 2 is not < 2
    "i2t_R3": 100.0,
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
    assert metrics["rsum"] == pytest.approx(200 + 1200 / 7)


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_hand_counted_per_query_ranks(chunk_size: int) -> None:
    image, text, ids = hand_case()
    t2i, i2t = retrieval_ranks(image, text, ids, chunk_size=chunk_size)
    assert t2i.tolist() == [3, 3, 1, 0, 0, 1, 1] and t2i.dtype == torch.long
    assert i2t.tolist() == [0, 2, 0, 2] and i2t.dtype == torch.long
    assert_metrics(metrics_from_ranks(t2i, i2t, ks=(1, 2, 3)), with_sums(HAND_EXPECTED))


def test_evaluate_retrieval_hands_out_the_ranks_behind_its_recalls() -> None:
    image, text, ids = hand_case()
    ranks: dict[str, torch.Tensor] = {}
    metrics = evaluate_retrieval(
        lambda x: x, lambda t: t, image, text, ids, batch_size=2, ks=(1, 2, 3), ranks_out=ranks
    )
    assert ranks["t2i_rank"].tolist() == [3, 3, 1, 0, 0, 1, 1]
    assert ranks["i2t_rank"].tolist() == [0, 2, 0, 2]
    assert_metrics(metrics, with_sums(HAND_EXPECTED))


def test_k_larger_than_n_counts_every_match() -> None:
    # 4 images and 7 captions: K = 5 and 10 exceed N_img, K = 10 exceeds N_txt; R@1 as above.
    image, text, ids = hand_case()
    metrics = retrieval_metrics(image, text, ids)
    expected = {
        "t2i_R1": 100 * 2 / 7,
        "t2i_R5": 100.0,
        "t2i_R10": 100.0,
        "i2t_R1": 50.0,
        "i2t_R5": 100.0,
        "i2t_R10": 100.0,
    }
    assert_metrics(metrics, with_sums(expected))
    assert list(metrics) == metric_keys()


def test_tie_with_a_duplicate_image_favours_the_true_match() -> None:
    # img0 and img1 are the same vector; c0 -> img0 and c1 -> img1 both score 1.0 against both.
    # Counting ">=" would put c0 and c1 at rank 1 (t2i_R1 = 33.3); strictly ">" gives rank 0.
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.6, 0.8]])  # c2 -> img2: .6, .6, .8 rank 0
    ids = torch.tensor([0, 1, 2])
    # i2t columns: img0 [1, 1, .6] own c0; img1 [1, 1, .6] own c1; img2 [0, 0, .8]: all rank 0.
    metrics = retrieval_metrics(image, text, ids, ks=(1,))
    assert_metrics(metrics, with_sums({"t2i_R1": 100.0, "i2t_R1": 100.0}))


def test_ties_below_the_top_are_not_counted() -> None:
    # One-hot images in 5-d. c0 -> img3 scores [.4, .4, .4, .4*, .6]: only .6 is strictly above,
    # so rank 1 (not 4). c1..c4 are e0, e1, e2, e4 -> rank 0. t2i_R1 = 4/5, t2i_R2 = 5/5.
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
    expected = {"t2i_R1": 80.0, "t2i_R2": 100.0, "i2t_R1": 100.0, "i2t_R2": 100.0}
    assert_metrics(metrics, with_sums(expected))


# --- independent brute-force reference -----------------------------------------------------------
def reference_metrics(
    image: np.ndarray, text: np.ndarray, ids: np.ndarray, ks: tuple[int, ...]
) -> dict[str, float]:
    """Full float64 score matrix, each row sorted by (score desc, true match first)."""
    scores = text.astype(np.float64) @ image.astype(np.float64).T
    t2i = []
    for j, row in enumerate(scores):
        is_true = np.arange(len(row)) == ids[j]
        order = np.lexsort((~is_true, -row))  # last key is the primary one
        t2i.append(int(np.flatnonzero(is_true[order])[0]))
    i2t = []
    for i, column in enumerate(scores.T):
        is_own = ids == i
        order = np.lexsort((~is_own, -column))
        i2t.append(int(np.flatnonzero(is_own[order])[0]))
    recalls = {f"t2i_R{k}": 100 * float(np.mean(np.array(t2i) < k)) for k in ks}
    recalls |= {f"i2t_R{k}": 100 * float(np.mean(np.array(i2t) < k)) for k in ks}
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
def test_matches_argsort_reference_with_exact_ties(seed: int) -> None:
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
def test_matches_argsort_reference_on_continuous_data(seed: int) -> None:
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
