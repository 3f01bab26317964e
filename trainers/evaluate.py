"""Retrieval recall of a dual encoder over an eval set where an image may have several captions.

The score of a (caption, image) pair is the dot product of their L2-normalised embeddings,
computed in float32 on the embeddings' device. Scores of one query within
``tie_tolerance(d)`` of each other are ties, and a tie does not favour the true match: a query
whose true match ties with other items counts its expected hit under a uniformly random order
of the tied items (``trainers.recall``), so an encoder that maps every caption to one vector
scores chance, not 100.

- text->image R@K: the mean over captions of the expected hit of its own image among all
  images;
- image->text R@K: the mean over images of the expected hit of its first own caption among
  all captions (an image hits when any own caption is in the top K).

Eval folds (``fold_size``, COCO's 1k protocol): the images are split into consecutive folds,
each caption goes with its image, and every query is ranked within its fold only; recalls still
average over all queries.

The score matrix is never held whole: captions (then images) are scored in chunks of
``chunk_size`` rows, so extra memory is O(chunk_size x max(N_txt, N_img)).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from trainers.errors import InputError
from trainers.recall import RANK_FIELDS, recall_metrics, with_tie_defaults

DEFAULT_KS = (1, 5, 10)
# float16 embeddings renormalised in float32 stay within ~1e-3 of unit norm; 1e-2 still catches
# a caller who forgot to normalise (or an encoder that returned zeros or NaNs).
_NORM_TOLERANCE = 1e-2
# Ranks are counted as float32 sums of 0/1 flags, exact up to 2^24.
MAX_ROWS = 2**24 - 1
# Column slices of a score block counted one at a time (see _count_band): each slice's int64
# flags take 9/64 of the block's float32 bytes.
_COUNT_SLICES = 16


def metric_keys(ks: Sequence[int] = DEFAULT_KS) -> list[str]:
    """The keys retrieval_metrics() returns for ``ks``, in its order."""
    return [f"t2i_R{k}" for k in ks] + [f"i2t_R{k}" for k in ks] + ["rsum", "mean_recall"]


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise InputError(f"ks: expected a non-empty sequence of positive ints, got {ks!r}")
    if len(set(ks)) != len(ks):
        raise InputError(f"ks: expected distinct values (they name the result keys), got {ks!r}")
    return ks


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name}: expected a positive int, got {value!r}")


def _check_text_to_image(text_to_image: Tensor, n_txt: int, n_img: int) -> None:
    """Shape, dtype and range of the caption -> image ids, and that every image has a caption."""
    if not isinstance(text_to_image, Tensor):
        raise InputError(f"text_to_image: expected a tensor, got {type(text_to_image).__name__}")
    if (
        text_to_image.dtype.is_floating_point
        or text_to_image.dtype.is_complex
        or (text_to_image.dtype == torch.bool)
    ):
        raise InputError(
            f"text_to_image: expected integer image ids (torch.long), got {text_to_image.dtype}"
        )
    if n_txt == 0:
        raise InputError("text_to_image: expected at least one caption, got none")
    if text_to_image.shape != (n_txt,):
        raise InputError(
            f"text_to_image: expected shape ({n_txt},), one image id per caption, "
            f"got {tuple(text_to_image.shape)}"
        )
    low, high = int(text_to_image.min()), int(text_to_image.max())
    if low < 0 or high >= n_img:
        raise InputError(
            f"text_to_image: expected image ids in [0, {n_img}), got values in [{low}, {high}]"
        )
    # An image with no caption has no image->text rank, so its recall is undefined: refuse it
    # rather than silently change the denominator or count it as a miss.
    counts = torch.bincount(text_to_image.long(), minlength=n_img)
    missing = torch.nonzero(counts == 0).flatten()
    if missing.numel():
        shown = ", ".join(str(i) for i in missing[:5].tolist())
        more = ", ..." if missing.numel() > 5 else ""
        raise InputError(
            f"text_to_image: expected every image to have at least one caption; "
            f"{missing.numel()} of {n_img} have none (ids {shown}{more})"
        )


def _check_embeddings(name: str, emb: Tensor) -> None:
    if not isinstance(emb, Tensor):
        raise InputError(f"{name}: expected a tensor, got {type(emb).__name__}")
    if emb.dim() != 2 or emb.shape[0] == 0 or emb.shape[1] == 0:
        raise InputError(f"{name}: expected a non-empty N x d matrix, got {tuple(emb.shape)}")
    if emb.shape[0] > MAX_ROWS:
        raise InputError(f"{name}: expected at most {MAX_ROWS} rows, got {emb.shape[0]}")
    if not emb.dtype.is_floating_point:
        raise InputError(f"{name}: expected floating-point embeddings, got {emb.dtype}")
    norms = torch.linalg.vector_norm(emb.float(), dim=1)
    # Written so that NaN norms fail too.
    bad = torch.nonzero(~((norms - 1).abs() <= _NORM_TOLERANCE)).flatten()
    if bad.numel():
        row = int(bad[0])
        raise InputError(
            f"{name}: expected L2-normalised rows (norm 1 +- {_NORM_TOLERANCE}), "
            f"row {row} has norm {float(norms[row]):.4g} ({bad.numel()} rows off)"
        )


def tie_tolerance(width: int) -> float:
    """Half-width of the tie band of a score between ``width``-component unit embeddings:
    ``width * 2**-23``. Two scores of one query closer than this are ties.

    A float32 dot product of d terms is off the exact one by at most gamma_d * sum |x_i y_i|,
    gamma_d = d u / (1 - d u) with u = 2^-24 (Higham, Accuracy and Stability of Numerical
    Algorithms, 3.1), and sum |x_i y_i| <= 1 for unit vectors. So two pairs whose exact scores
    are equal (a repeated caption, an encoder that returns one vector for every input) may be
    computed up to 2 gamma_d ~ d 2^-23 apart, and they are: a chunked or blocked matmul does
    not sum every row in the same order. Scores this close cannot be told apart, so they tie.
    """
    return width * 2.0**-23


@dataclass(frozen=True)
class QueryRanks:
    """Per-query counts behind every recall, torch.long on CPU (see ``trainers.recall``).

    ``t2i_rank`` / ``t2i_ties`` (N_txt): per caption, the images scoring above its own image's
    tie band / the other images inside it. ``i2t_rank`` / ``i2t_ties`` (N_img): per image, the
    captions of other images scoring above / inside the tie band of its best own caption;
    ``i2t_own`` (N_img, >= 1): its own captions inside that band. With eval folds, counts are
    within the query's fold; the arrays stay aligned with the whole set's captions and images.
    """

    t2i_rank: Tensor
    t2i_ties: Tensor
    i2t_rank: Tensor
    i2t_ties: Tensor
    i2t_own: Tensor

    def tensors(self) -> dict[str, Tensor]:
        """The five arrays by field name (``trainers.recall.RANK_FIELDS``)."""
        return {name: getattr(self, name) for name in RANK_FIELDS}

    def arrays(self) -> dict[str, np.ndarray]:
        """The five arrays as int64 numpy, as ``eval_ranks.npz`` holds them."""
        return {name: value.numpy() for name, value in self.tensors().items()}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> QueryRanks:
        """From a mapping of the field names to tensors or arrays, e.g. a loaded
        ``eval_ranks.npz``; a file written before ties were counted (ranks only) reads as
        ties 0 and own 1 (``trainers.recall.with_tie_defaults``)."""
        plain = {k: v.numpy() if isinstance(v, Tensor) else v for k, v in arrays.items()}
        full = with_tie_defaults(plain)
        return cls(**{name: torch.from_numpy(full[name]) for name in RANK_FIELDS})


def _count_band(scores: Tensor, centre: Tensor, tol: float) -> tuple[Tensor, Tensor]:
    """Per row of ``scores`` (chunk x N float32): how many entries are above ``centre + tol``
    and how many are at least ``centre - tol`` (``centre``: chunk x 1). Overwrites ``scores``.
    Returns two chunk long tensors."""
    # Summing a bool mask casts it to int64 (twice the block's bytes), so the first count runs
    # over column slices whose masks stay a small fraction of the block. The second writes its
    # 0/1 flags into the scores' own memory; float32 sums of 0/1 are exact below 2^24, hence
    # MAX_ROWS.
    high = centre + tol
    width = -(-scores.shape[1] // _COUNT_SLICES)
    above = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    for start in range(0, scores.shape[1], width):
        above += (scores[:, start : start + width] > high).sum(dim=1)
    at_least = scores.ge_(centre - tol).sum(dim=1).long()
    return above, at_least


def _t2i_ranks(
    image: Tensor, text: Tensor, text_to_image: Tensor, chunk_size: int, tol: float
) -> tuple[Tensor, Tensor]:
    """``(rank, ties)`` of each caption's own image among ``image``, N_txt long each."""
    ranks = torch.empty(text.shape[0], dtype=torch.long, device=text.device)
    ties = torch.empty_like(ranks)
    for start in range(0, text.shape[0], chunk_size):
        stop = min(start + chunk_size, text.shape[0])
        scores = text[start:stop] @ image.T  # chunk x N_img
        # Read the true score out of the same product so both sides of the comparison went
        # through identical arithmetic: the own image is always inside its own band.
        true = scores.gather(1, text_to_image[start:stop, None])
        above, at_least = _count_band(scores, true, tol)
        ranks[start:stop] = above
        ties[start:stop] = at_least - above - 1  # less the caption's own image
        del scores  # else the next chunk's block is allocated while this one is alive
    return ranks, ties


def _i2t_ranks(
    image: Tensor, text: Tensor, text_to_image: Tensor, chunk_size: int, tol: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``(rank, ties, own)`` of each image's best own caption among ``text``, N_img long each."""
    n_img = image.shape[0]
    # Captions grouped by image, so a chunk of images [start, stop) owns one contiguous slice.
    order = torch.argsort(text_to_image, stable=True)
    offsets = torch.zeros(n_img + 1, dtype=torch.long, device=text.device)
    offsets[1:] = torch.cumsum(torch.bincount(text_to_image, minlength=n_img), dim=0)
    offsets = offsets.tolist()
    ranks = torch.empty(n_img, dtype=torch.long, device=text.device)
    ties = torch.empty_like(ranks)
    owns = torch.empty_like(ranks)
    for start in range(0, n_img, chunk_size):
        stop = min(start + chunk_size, n_img)
        scores = image[start:stop] @ text.T  # chunk x N_txt
        own = order[offsets[start] : offsets[stop]]
        rows = text_to_image[own] - start
        own_scores = scores[rows, own]
        best = torch.full((stop - start,), float("-inf"), dtype=scores.dtype, device=text.device)
        best.scatter_reduce_(0, rows, own_scores, reduce="amax")
        # Own captions cannot score above the best one, so every own caption in the band is in
        # the "at least" count and none in the "above" one.
        in_band = (own_scores >= best[rows] - tol).long()
        own_count = torch.zeros(stop - start, dtype=torch.long, device=text.device)
        own_count.scatter_add_(0, rows, in_band)
        above, at_least = _count_band(scores, best[:, None], tol)
        ranks[start:stop] = above
        ties[start:stop] = at_least - above - own_count
        owns[start:stop] = own_count
        del scores  # else the next chunk's block is allocated while this one is alive
    return ranks, ties, owns


def check_fold_size(n_images: int, fold_size: int | None, name: str = "fold_size") -> None:
    """InputError (one line, naming ``name``) unless ``n_images`` splits into whole folds of
    ``fold_size`` images; None (no folds) and a set of at most one fold always pass."""
    if fold_size is None:
        return
    _check_positive(name, fold_size)
    if n_images > fold_size and n_images % fold_size:
        raise InputError(
            f"{name}: expected an eval set of a multiple of {fold_size} images (or at most "
            f"{fold_size}) to split into folds, got {n_images} images; set {name} to a "
            f"divisor of {n_images}, or to none to rank the whole set"
        )


def _fold_ranks(
    image: Tensor, text: Tensor, ids: Tensor, chunk_size: int, fold_size: int | None
) -> QueryRanks:
    """Every query ranked within its fold of ``fold_size`` consecutive images (and their
    captions); None or a single fold ranks the whole set."""
    tol = tie_tolerance(image.shape[1])
    n_img = image.shape[0]
    if fold_size is None or n_img <= fold_size:
        return QueryRanks(
            *_t2i_ranks(image, text, ids, chunk_size, tol),
            *_i2t_ranks(image, text, ids, chunk_size, tol),
        )
    t2i = torch.empty((2, text.shape[0]), dtype=torch.long, device=text.device)
    i2t = torch.empty((3, n_img), dtype=torch.long, device=text.device)
    caption_fold = torch.div(ids, fold_size, rounding_mode="floor")
    for fold, start in enumerate(range(0, n_img, fold_size)):
        stop = start + fold_size
        captions = torch.nonzero(caption_fold == fold).flatten()
        fold_image, fold_text, fold_ids = image[start:stop], text[captions], ids[captions] - start
        t2i[:, captions] = torch.stack(_t2i_ranks(fold_image, fold_text, fold_ids, chunk_size, tol))
        i2t[:, start:stop] = torch.stack(
            _i2t_ranks(fold_image, fold_text, fold_ids, chunk_size, tol)
        )
    return QueryRanks(t2i[0], t2i[1], i2t[0], i2t[1], i2t[2])


def retrieval_ranks(
    image_emb: Tensor,
    text_emb: Tensor,
    text_to_image: Tensor,
    chunk_size: int = 1024,
    *,
    fold_size: int | None = None,
) -> QueryRanks:
    """Per-query ranks and ties, the raw material of every recall (and of bootstrap
    intervals).

    Same inputs and checks as ``retrieval_metrics``. Returns a ``QueryRanks`` on CPU: per
    caption the images above / tied with its own image, per image the captions of other images
    above / tied with its best own caption and its own captions tied at the top; scores within
    ``tie_tolerance(d)`` of each other are ties. ``fold_size``: rank each query only within its
    fold of that many consecutive images and their captions (``check_fold_size``).
    """
    _check_positive("chunk_size", chunk_size)
    _check_embeddings("image_emb", image_emb)
    _check_embeddings("text_emb", text_emb)
    if image_emb.shape[1] != text_emb.shape[1]:
        raise InputError(
            f"text_emb: expected width {image_emb.shape[1]} like image_emb, got {text_emb.shape[1]}"
        )
    if image_emb.device != text_emb.device:
        raise InputError(
            f"text_emb: expected the device of image_emb ({image_emb.device}), "
            f"got {text_emb.device}"
        )
    _check_text_to_image(text_to_image, text_emb.shape[0], image_emb.shape[0])
    check_fold_size(image_emb.shape[0], fold_size)
    with torch.no_grad():
        image = image_emb.detach().float()
        text = text_emb.detach().float()
        ids = text_to_image.detach().to(device=image.device, dtype=torch.long)
        ranks = _fold_ranks(image, text, ids, chunk_size, fold_size)
    return QueryRanks(**{name: value.cpu() for name, value in ranks.tensors().items()})


def metrics_from_ranks(ranks: QueryRanks, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """``t2i_R{k}``, ``i2t_R{k}`` (percent: 100 x the mean expected hit, ``trainers.recall``),
    ``rsum`` and ``mean_recall`` from the ranks of ``retrieval_ranks``."""
    ks = _check_ks(ks)
    return recall_metrics(ranks.arrays(), ks)


def retrieval_metrics(
    image_emb: Tensor,
    text_emb: Tensor,
    text_to_image: Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    chunk_size: int = 1024,
    *,
    fold_size: int | None = None,
) -> dict[str, float]:
    """Text->image and image->text recall at each K, in percent (0-100).

    image_emb: N_img x d, text_emb: N_txt x d, rows L2-normalised (float16/bfloat16/float32/
    float64, CPU or CUDA, same device); scores are computed in float32. text_to_image: N_txt
    integer ids, the image of each caption; every image needs at least one caption.
    Returns ``t2i_R{k}`` and ``i2t_R{k}`` for each k in ks (a K above N gives 100), ``rsum``
    (sum of the 2*len(ks) recalls) and ``mean_recall`` (rsum / (2*len(ks))), as Python floats.
    A query whose true match ties with other items counts its expected hit under a random
    order of the tied items. ``fold_size``: rank within folds of that many images (COCO's 1k
    protocol), averaging over all queries; None ranks the whole set.
    Extra memory is O(chunk_size x max(N_img, N_txt)); the N_txt x N_img score matrix is never
    materialised. Raises InputError (a ValueError) on bad shapes, dtypes, ids, non-normalised or
    non-finite rows, more than MAX_ROWS (2^24 - 1) rows, images without a caption, or a set
    that does not split into whole folds.
    """
    ks = _check_ks(ks)
    ranks = retrieval_ranks(image_emb, text_emb, text_to_image, chunk_size, fold_size=fold_size)
    return metrics_from_ranks(ranks, ks)


@torch.no_grad()
def encode_batches(
    encode: Callable[[Tensor], Tensor],
    inputs: Tensor,
    batch_size: int,
    device: torch.device | str,
) -> Tensor:
    """Embed ``inputs`` (N x ...) in batches of at most ``batch_size`` rows on ``device``.

    ``encode`` maps a B x ... batch on ``device`` to B x d; put its module in eval mode first.
    Returns N x d, L2-normalised in float32, on CPU, detached (runs under no_grad).
    """
    _check_positive("batch_size", batch_size)
    if not isinstance(inputs, Tensor) or inputs.dim() == 0 or inputs.shape[0] == 0:
        shape = tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__
        raise InputError(f"inputs: expected a non-empty N x ... tensor, got {shape}")
    outputs = []
    for start in range(0, inputs.shape[0], batch_size):
        batch = inputs[start : start + batch_size].to(device)
        out = encode(batch)
        if out.dim() != 2 or out.shape[0] != batch.shape[0]:
            raise InputError(
                f"encode: expected a {batch.shape[0]} x d output for a batch of "
                f"{batch.shape[0]}, got {tuple(out.shape)}"
            )
        # Normalise in float32: a float16 squared norm overflows above ~256 per component.
        outputs.append(F.normalize(out.float(), dim=1).cpu())
    return torch.cat(outputs)


def evaluate_retrieval(
    encode_image: Callable[[Tensor], Tensor],
    encode_text: Callable[[Tensor], Tensor],
    images: Tensor,
    tokens: Tensor,
    text_to_image: Tensor,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    chunk_size: int = 1024,
    ks: Sequence[int] = DEFAULT_KS,
    ranks_out: dict[str, Tensor] | None = None,
    *,
    fold_size: int | None = None,
) -> dict[str, float]:
    """Encode an eval set (images N_img x C x H x W, tokens N_txt x L) and score its retrieval.

    Embeddings are computed batch by batch on ``device``, kept on CPU, and scored on ``device``
    by retrieval_metrics(); same keys, units and ``fold_size``. The ids and the folds are
    checked before any encoding, so a bad eval set fails fast. ``ranks_out``, when given,
    receives the five ``QueryRanks`` arrays by name (``t2i_rank``, ``t2i_ties``, ``i2t_rank``,
    ``i2t_ties``, ``i2t_own``) so callers can keep the per-query ranks behind the recalls.
    """
    ks = _check_ks(ks)
    _check_text_to_image(text_to_image, len(tokens), len(images))
    check_fold_size(len(images), fold_size)
    image_emb = encode_batches(encode_image, images, batch_size, device)
    text_emb = encode_batches(encode_text, tokens, batch_size, device)
    ranks = retrieval_ranks(
        image_emb.to(device),
        text_emb.to(device),
        text_to_image.to(device),
        chunk_size,
        fold_size=fold_size,
    )
    if ranks_out is not None:
        ranks_out.update(ranks.tensors())
    return metrics_from_ranks(ranks, ks)
