"""`conaclip data`: write the built-in data set, check shards, convert Karpathy-split
Flickr30K / MSCOCO into train and eval shards.

The Karpathy split JSON (``dataset_flickr30k.json``, ``dataset_coco.json``) lists
``images[]`` with ``filename``, optional ``filepath`` (COCO's ``val2014``...), ``split``
(train / restval / val / test) and ``sentences[].raw``. Train shards get one sample per image
with every caption in ``{key}.json`` "captions" (the train pipeline draws one per visit);
eval shards get the first ``--captions-per-image`` captions, the Flickr30K / MSCOCO-5K
protocol.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainers.errors import InputError

# trainers.data and trainers.synthetic (torch, webdataset) are imported where used, so that
# `conaclip --help` does not pay for them.

TRAIN_SPLITS = ("train", "restval")


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
        "(shard, key, reason). Exit 0 when all are good, 1 otherwise.",
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
    from trainers.synthetic import synthesize

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
    from trainers.data import check_shards

    report = check_shards(args.shards, required_arrays=args.require, progress=not args.no_progress)
    width = max([len("shard"), *(len(c.shard) for c in report.shards)])
    print(f"{'shard':<{width}}  {'good':>8}  {'bad':>6}")
    for count in report.shards:
        print(f"{count.shard:<{width}}  {count.good:>8}  {count.bad:>6}")
    total_good = sum(c.good for c in report.shards)
    label = f"total ({len(report.shards)} shards)"
    print(f"{label:<{width}}  {total_good:>8}  {len(report.bad):>6}")
    if report.bad:
        print(f"{len(report.bad)} bad sample(s): shard key: reason")
        for bad in report.bad:
            print(f"  {bad}")
        return 1
    return 0


def _from_karpathy(args: argparse.Namespace) -> int:
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


# --------------------------------------------------------------------------- Karpathy split


@dataclass(frozen=True)
class KarpathyImage:
    path: Path
    split: str
    captions: list[str]
    record: dict[str, Any]


@dataclass(frozen=True)
class ConvertResult:
    train_shards: list[Path]
    eval_shards: list[Path]
    train_images: int
    eval_images: int
    eval_captions: int


def _field(record: Any, name: str, where: str, json_path: Path, expected: str) -> Any:
    if not isinstance(record, dict) or name not in record:
        raise InputError(f"{json_path}: {where}.{name} missing; expected {expected}")
    return record[name]


def read_karpathy(json_path: Path, images_dir: Path) -> list[KarpathyImage]:
    """The image records of a Karpathy-split JSON, validated; ``InputError`` naming file and
    field (``images[3].sentences[0].raw``) for anything that is not as expected."""
    from trainers.data import IMAGE_EXTENSIONS

    if not json_path.is_file():
        raise InputError(f"--json {json_path}: file not found; expected a Karpathy-split JSON")
    try:
        document = json.loads(json_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise InputError(f"{json_path}: not valid JSON ({error})") from None
    records = document.get("images") if isinstance(document, dict) else None
    if not isinstance(records, list):
        raise InputError(f"{json_path}: field 'images' missing; expected a list of image records")
    images = []
    for index, record in enumerate(records):
        where = f"images[{index}]"
        filename = _field(record, "filename", where, json_path, "an image file name")
        split = _field(record, "split", where, json_path, "train, restval, val or test")
        sentences = _field(record, "sentences", where, json_path, 'a list of {"raw": caption}')
        filepath = record.get("filepath", "")
        if not isinstance(filename, str) or not filename or not isinstance(filepath, str):
            raise InputError(f"{json_path}: {where}.filename/filepath must be strings")
        if not isinstance(split, str):
            raise InputError(f"{json_path}: {where}.split must be a string")
        if not isinstance(sentences, list) or not sentences:
            raise InputError(f"{json_path}: {where}.sentences must be a non-empty list")
        captions = []
        for position, sentence in enumerate(sentences):
            raw = _field(sentence, "raw", f"{where}.sentences[{position}]", json_path, "a caption")
            if not isinstance(raw, str) or not raw.strip():
                raise InputError(
                    f"{json_path}: {where}.sentences[{position}].raw must be a non-empty string"
                )
            captions.append(raw.strip())
        extension = Path(filename).suffix.lower().lstrip(".")
        if extension not in IMAGE_EXTENSIONS:
            raise InputError(
                f"{json_path}: {where}.filename {filename!r}; expected an image file "
                f"(.{', .'.join(IMAGE_EXTENSIONS)})"
            )
        images.append(KarpathyImage(images_dir / filepath / filename, split, captions, record))
    return images


def _samples(
    images: Sequence[KarpathyImage], first: int, captions_per_image: int | None, bar: Any
) -> Iterator[dict[str, Any]]:
    for index, image in enumerate(images, start=first):
        key = f"{index:08d}"
        captions = image.captions[:captions_per_image] if captions_per_image else image.captions
        meta = {
            "key": key,
            "caption": captions[0],
            "captions": captions,
            "filename": image.record["filename"],
            "filepath": image.record.get("filepath", ""),
            "split": image.split,
            **{k: image.record[k] for k in ("imgid", "cocoid", "sentids") if k in image.record},
        }
        extension = image.path.suffix.lower().lstrip(".")
        yield {
            "__key__": key,
            extension: image.path.read_bytes(),
            "txt": captions[0].encode("utf-8"),
            "json": json.dumps(meta).encode("utf-8"),
        }
        bar.update(1)


def _write_split(
    images: Sequence[KarpathyImage], out: Path, captions: int | None, per_shard: int, bar: Any
) -> list[Path]:
    from trainers.data import write_shard, write_shard_stats

    shards = []
    for number, start in enumerate(range(0, len(images), per_shard)):
        path = out / f"{number:05d}.tar"
        samples = _samples(images[start : start + per_shard], start, captions, bar)
        write_shard_stats(path, write_shard(path, samples), {"source": "karpathy"})
        shards.append(path)
    return shards


def convert_karpathy(
    json_path: str | Path,
    images_dir: str | Path,
    out_dir: str | Path,
    eval_split: str = "test",
    captions_per_image: int = 5,
    samples_per_shard: int = 1000,
    progress: bool = True,
) -> ConvertResult:
    """Write ``out_dir/train`` (splits train + restval, every caption) and ``out_dir/eval``
    (``eval_split``, first ``captions_per_image`` captions) shards. Everything is checked
    before the first byte is written: the JSON's fields, that every image file exists, that
    the eval split is not empty and that ``out_dir`` holds no shards yet."""
    from tqdm import tqdm

    json_path, images_dir, out = Path(json_path), Path(images_dir), Path(out_dir)
    if not images_dir.is_dir():
        raise InputError(f"--images {images_dir}: not a directory; expected the image root")
    images = read_karpathy(json_path, images_dir)
    train = [i for i in images if i.split in TRAIN_SPLITS]
    evals = [i for i in images if i.split == eval_split]
    if not evals:
        found = sorted({i.split for i in images})
        raise InputError(f"{json_path}: no image has split {eval_split!r}; splits present: {found}")
    missing = [i.path for i in train + evals if not i.path.is_file()]
    if missing:
        raise InputError(
            f"--images {images_dir}: {len(missing)} of {len(train) + len(evals)} image files "
            f"missing, first: {missing[0]}"
        )
    for split in ("train", "eval"):
        existing = sorted((out / split).glob("*.tar")) if (out / split).is_dir() else []
        if existing:
            raise InputError(
                f"--out {out}: {existing[0]} exists; expected an empty or new directory"
            )

    with tqdm(
        total=len(train) + len(evals), unit="image", desc="convert", disable=not progress
    ) as bar:
        train_shards = _write_split(train, out / "train", None, samples_per_shard, bar)
        eval_shards = _write_split(evals, out / "eval", captions_per_image, samples_per_shard, bar)
    return ConvertResult(
        train_shards=train_shards,
        eval_shards=eval_shards,
        train_images=len(train),
        eval_images=len(evals),
        eval_captions=sum(min(len(i.captions), captions_per_image) for i in evals),
    )
