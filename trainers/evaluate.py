"""Retrieval recall of a dual encoder over an eval set where an image may have several captions.

The score of a (caption, image) pair is the dot product of their L2-normalised embeddings,
computed in float32 on the embeddings' device. Ranks count strictly greater scores, so a tie
favours the true match:

- text->image R@K: the share of captions whose own image has rank < K among all images;
- image->text R@K: the share of images with at least one own caption of rank < K among all
  captions, i.e. the best-scoring own caption has fewer than K captions strictly above it.

The score matrix is never held whole: captions (then images) are scored in chunks of
``chunk_size`` rows, so extra memory is O(chunk_size x max(N_txt, N_img)).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from trainers.errors import InputError

DEFAULT_KS = (1, 5, 10)
# float16 embeddings renormalised in float32 stay within ~1e-3 of unit norm; 1e-2 still catches
# a caller who forgot to normalise (or an encoder that returned zeros or NaNs).
_NORM_TOLERANCE = 1e-2
# Ranks are counted as float32 sums of 0/1 flags, exact up to 2^24.
MAX_ROWS = 2**24 - 1


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


def _count_above(scores: Tensor, threshold: Tensor) -> Tensor:
    """Per row of ``scores`` (chunk x N float32), how many entries are strictly above
    ``threshold`` (chunk x 1). Overwrites ``scores``. Returns chunk long."""
    # Writing the 0/1 flags into the scores' own memory keeps the peak at one chunk x N float32
    # matrix; a bool mask summed to long would add 9 bytes per entry. Float32 sums of 0/1 are
    # exact below 2^24, hence MAX_ROWS.
    return scores.gt_(threshold).sum(dim=1).long()


def _t2i_ranks(image: Tensor, text: Tensor, text_to_image: Tensor, chunk_size: int) -> Tensor:
    """Rank of each caption's own image: images scoring strictly higher. N_txt long."""
    ranks = torch.empty(text.shape[0], dtype=torch.long, device=text.device)
    for start in range(0, text.shape[0], chunk_size):
        stop = min(start + chunk_size, text.shape[0])
        scores = text[start:stop] @ image.T  # chunk x N_img
        # Read the true score out of the same product so both sides of the comparison went
        # through identical arithmetic: an exact tie stays a tie.
        true = scores.gather(1, text_to_image[start:stop, None])
        ranks[start:stop] = _count_above(scores, true)
        del scores  # else the next chunk's block is allocated while this one is alive
    return ranks


def _i2t_ranks(image: Tensor, text: Tensor, text_to_image: Tensor, chunk_size: int) -> Tensor:
    """Rank of each image's best own caption: captions scoring strictly higher. N_img long."""
    n_img = image.shape[0]
    # Captions grouped by image, so a chunk of images [start, stop) owns one contiguous slice.
    order = torch.argsort(text_to_image, stable=True)
    offsets = torch.zeros(n_img + 1, dtype=torch.long, device=text.device)
    offsets[1:] = torch.cumsum(torch.bincount(text_to_image, minlength=n_img), dim=0)
    offsets = offsets.tolist()
    ranks = torch.empty(n_img, dtype=torch.long, device=text.device)
    for start in range(0, n_img, chunk_size):
        stop = min(start + chunk_size, n_img)
        scores = image[start:stop] @ text.T  # chunk x N_txt
        own = order[offsets[start] : offsets[stop]]
        rows = text_to_image[own] - start
        best = torch.full((stop - start,), float("-inf"), dtype=scores.dtype, device=text.device)
        best.scatter_reduce_(0, rows, scores[rows, own], reduce="amax")
        ranks[start:stop] = _count_above(scores, best[:, None])
        del scores  # else the next chunk's block is allocated while this one is alive
    return ranks


def retrieval_ranks(
    image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor, chunk_size: int = 1024
) -> tuple[Tensor, Tensor]:
    """Per-query ranks, the raw material of every recall (and of bootstrap intervals).

    Same inputs and checks as ``retrieval_metrics``. Returns ``(t2i_rank, i2t_rank)`` on CPU,
    torch.long: ``t2i_rank`` (N_txt) counts the images scoring strictly higher than each
    caption's own image (0 = its image is first); ``i2t_rank`` (N_img) counts the captions
    scoring strictly higher than each image's best own caption. R@K = share of ranks < K.
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
    with torch.no_grad():
        image = image_emb.detach().float()
        text = text_emb.detach().float()
        ids = text_to_image.detach().to(device=image.device, dtype=torch.long)
        t2i = _t2i_ranks(image, text, ids, chunk_size)
        i2t = _i2t_ranks(image, text, ids, chunk_size)
    return t2i.cpu(), i2t.cpu()


def metrics_from_ranks(
    t2i_rank: Tensor, i2t_rank: Tensor, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """``t2i_R{k}``, ``i2t_R{k}`` (percent), ``rsum`` and ``mean_recall`` from the ranks of
    ``retrieval_ranks``."""
    ks = _check_ks(ks)
    metrics: dict[str, float] = {}
    for name, ranks in (("t2i", t2i_rank), ("i2t", i2t_rank)):
        for k in ks:
            hits = int((ranks < k).sum())
            metrics[f"{name}_R{k}"] = 100.0 * hits / ranks.numel()
    recalls = list(metrics.values())
    metrics["rsum"] = sum(recalls)
    metrics["mean_recall"] = metrics["rsum"] / len(recalls)
    return metrics


def retrieval_metrics(
    image_emb: Tensor,
    text_emb: Tensor,
    text_to_image: Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Text->image and image->text recall at each K, in percent (0-100).

    image_emb: N_img x d, text_emb: N_txt x d, rows L2-normalised (float16/bfloat16/float32/
    float64, CPU or CUDA, same device); scores are computed in float32. text_to_image: N_txt
    integer ids, the image of each caption; every image needs at least one caption.
    Returns ``t2i_R{k}`` and ``i2t_R{k}`` for each k in ks (a K above N gives 100), ``rsum``
    (sum of the 2*len(ks) recalls) and ``mean_recall`` (rsum / (2*len(ks))), as Python floats.
    Extra memory is O(chunk_size x max(N_img, N_txt)); the N_txt x N_img score matrix is never
    materialised. Raises InputError (a ValueError) on bad shapes, dtypes, ids, non-normalised or
    non-finite rows, more than MAX_ROWS (2^24 - 1) rows, or images without a caption.
    """
    ks = _check_ks(ks)
    t2i, i2t = retrieval_ranks(image_emb, text_emb, text_to_image, chunk_size)
    return metrics_from_ranks(t2i, i2t, ks)


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
) -> dict[str, float]:
    """Encode an eval set (images N_img x C x H x W, tokens N_txt x L) and score its retrieval.

    Embeddings are computed batch by batch on ``device``, kept on CPU, and scored on ``device``
    by retrieval_metrics(); same keys and units. The ids are checked before any encoding, so a
    bad eval set fails fast. ``ranks_out``, when given, receives ``t2i_rank`` and ``i2t_rank``
    (see ``retrieval_ranks``) so callers can keep the per-query ranks behind the recalls.
    """
    ks = _check_ks(ks)
    _check_text_to_image(text_to_image, len(tokens), len(images))
    image_emb = encode_batches(encode_image, images, batch_size, device)
    text_emb = encode_batches(encode_text, tokens, batch_size, device)
    t2i, i2t = retrieval_ranks(
        image_emb.to(device), text_emb.to(device), text_to_image.to(device), chunk_size
    )
    if ranks_out is not None:
        ranks_out.update(t2i_rank=t2i, i2t_rank=i2t)
    return metrics_from_ranks(t2i, i2t, ks)
