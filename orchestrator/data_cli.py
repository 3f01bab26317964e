"""`conaclip data`: write the built-in data set, check shards, convert Karpathy-split
Flickr30K / MSCOCO into train and eval shards. Each action parses its flags, calls one
function of ``trainers`` and prints what it did."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainers.shards import CheckReport

# trainers.synth_shards, trainers.shards and trainers.karpathy (torch, webdataset) are imported
# where used, so that `conaclip --help` does not pay for them.


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``data`` (``synth``, ``check``, ``from-karpathy``); handlers return the exit code."""
    data = subparsers.add_parser(
        "data",
        help="write the built-in data set, check shards, convert Karpathy-split Flickr30K/COCO",
        description="Data sets as img2dataset-layout WebDataset shards.",
    )
    actions = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    synth = actions.add_parser(
        "synth",
        help="write the built-in shapes-world set (train + 5-caption eval shards)",
        description="Write DIR/train/*.tar and DIR/eval/*.tar: pictures of 1-3 shapes with "
        "composed captions, deterministic for a seed, generated in parallel.",
    )
    synth.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    synth.add_argument(
        "--train-samples", type=_positive_int, default=20_000, metavar="N",
        help="train samples, one caption each (default 20000, 1000 per shard)",
    )  # fmt: skip
    synth.add_argument(
        "--eval-images", type=_positive_int, default=1_000, metavar="M",
        help="eval images, 5 captions each (default 1000)",
    )  # fmt: skip
    synth.add_argument(
        "--image-size", type=_positive_int, default=64, metavar="S",
        help="side in pixels, 32-512 (default 64)",
    )  # fmt: skip
    synth.add_argument("--seed", type=int, default=0, metavar="K", help="default 0")
    synth.add_argument(
        "--workers", type=_positive_int, default=None, help="processes (default: all cores)"
    )
    synth.add_argument("--no-progress", action="store_true", help="no progress bar")
    synth.set_defaults(handler=_synth)

    check = actions.add_parser(
        "check",
        help="read every sample; per-shard counts and each bad sample; exit 1 if any is bad",
        description="Read every sample of the shards (paths, brace patterns, globs, directories "
        "or URLs) as training would; print per-shard counts and each bad sample "
        "(shard, key, reason), and warn of captions shared by several images and of identical "
        "images under several keys (they tie in recall). Exit 0 when all are good, 1 otherwise; "
        "repeats alone do not fail the check.",
    )
    check.add_argument("shards", nargs="+", metavar="SHARDS")
    check.add_argument(
        "--require",
        action="append",
        default=[],
        metavar="FIELD",
        help="a member every sample must have, e.g. teacher_image.npy (repeatable)",
    )
    check.add_argument("--no-progress", action="store_true", help="no progress bar")
    check.set_defaults(handler=_check)

    karpathy = actions.add_parser(
        "from-karpathy",
        help="convert Karpathy-split Flickr30K/MSCOCO (JSON + image folder) into shards",
        description="Convert the Karpathy-split JSON used for Flickr30K and MSCOCO "
        "(images[].filename, filepath, split, sentences[].raw) into OUT/train (train + restval) "
        "and OUT/eval (the eval split, N captions per image) shards.",
    )
    karpathy.add_argument(
        "--json", type=Path, required=True, metavar="FILE", dest="json_path",
        help="dataset_flickr30k.json or dataset_coco.json (Karpathy split)",
    )  # fmt: skip
    karpathy.add_argument("--images", type=Path, required=True, metavar="DIR", help="image root")
    karpathy.add_argument(
        "--out", type=Path, required=True, metavar="SHARDS", help="writes SHARDS/train, SHARDS/eval"
    )
    karpathy.add_argument(
        "--eval-split", default="test", help="split for the eval shards (default test)"
    )
    karpathy.add_argument(
        "--captions-per-image", type=_positive_int, default=5, metavar="N",
        help="eval captions kept per image (default 5)",
    )  # fmt: skip
    karpathy.add_argument(
        "--samples-per-shard", type=_positive_int, default=1000, metavar="N", help="default 1000"
    )
    karpathy.add_argument("--no-progress", action="store_true", help="no progress bar")
    karpathy.set_defaults(handler=_from_karpathy)


# --------------------------------------------------------------------------- handlers


def _synth(args: argparse.Namespace) -> int:
    from trainers.synth_shards import synthesize

    result = synthesize(
        args.out,
        train_samples=args.train_samples,
        eval_images=args.eval_images,
        image_size=args.image_size,
        seed=args.seed,
        workers=args.workers,
        progress=not args.no_progress,
    )
    total = result.train_samples + result.eval_images
    print(
        f"wrote {result.train_samples} train samples ({len(result.train_shards)} shards) to "
        f"{result.out_dir / 'train'} and {result.eval_images} eval images x 5 captions "
        f"({len(result.eval_shards)} shards) to {result.out_dir / 'eval'} in "
        f"{result.seconds:.1f} s ({total / max(result.seconds, 1e-9):.0f} samples/s)"
    )
    return 0


def _check(args: argparse.Namespace) -> int:
    from trainers.shards import check_shards

    report = check_shards(args.shards, required_arrays=args.require, progress=not args.no_progress)
    width = max([len("shard"), *(len(c.shard) for c in report.shards)])
    print(f"{'shard':<{width}}  {'good':>8}  {'bad':>6}")
    for count in report.shards:
        print(f"{count.shard:<{width}}  {count.good:>8}  {count.bad:>6}")
    total_good = sum(c.good for c in report.shards)
    label = f"total ({len(report.shards)} shards)"
    print(f"{label:<{width}}  {total_good:>8}  {len(report.bad):>6}")
    for line in _repeat_warnings(report):
        print(line)
    if report.bad:
        print(f"{len(report.bad)} bad sample(s): shard key: reason")
        for bad in report.bad:
            print(f"  {bad}")
        return 1
    return 0


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _keys(count: int, keys: tuple[str, ...]) -> str:
    more = f", +{count - len(keys)} more" if count > len(keys) else ""
    return ", ".join(keys) + more


def _repeat_warnings(report: CheckReport) -> list[str]:
    """Warning lines for the repeats of a ``CheckReport``: counts, why they matter, examples."""
    lines = []
    captions, images = report.repeated_captions, report.repeated_images
    if captions.texts:
        lines += [
            f"warning: {_plural(captions.texts, 'caption text')} owned by more than one image "
            f"({_plural(captions.captions, 'caption')}; "
            f"{_plural(captions.images_all_shared, 'image')} with no caption of its own). A "
            "repeated caption makes several images equally right for one query; recall gives "
            "such ties their expected value under a random order, so no model can score them "
            "fully. Examples:",
            *(f"  {text!r}: {_keys(n, keys)}" for text, n, keys in captions.examples),
        ]
    if images.groups:
        lines += [
            f"warning: {_plural(images.groups, 'image')} stored under more than one key "
            f"({_plural(images.images, 'sample')}; identical bytes, sha1). Copies of one image "
            "tie for each other's captions; recall gives such ties their expected value under "
            "a random order. Examples:",
            *(f"  {_keys(n, keys)}" for n, keys in images.examples),
        ]
    return lines


def _from_karpathy(args: argparse.Namespace) -> int:
    from trainers.karpathy import convert_karpathy

    result = convert_karpathy(
        args.json_path,
        args.images,
        args.out,
        eval_split=args.eval_split,
        captions_per_image=args.captions_per_image,
        samples_per_shard=args.samples_per_shard,
        progress=not args.no_progress,
    )
    print(
        f"wrote {result.train_images} train images ({len(result.train_shards)} shards) and "
        f"{result.eval_images} eval images / {result.eval_captions} captions "
        f"({len(result.eval_shards)} shards) under {args.out}; "
        f"verify with: conaclip data check {args.out}/train {args.out}/eval"
    )
    return 0
