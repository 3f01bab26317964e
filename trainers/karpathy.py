"""The Karpathy split of Flickr30K / MSCOCO converted into img2dataset-layout train and eval
shards.

The Karpathy split JSON (``dataset_flickr30k.json``, ``dataset_coco.json``) lists
``images[]`` with ``filename``, optional ``filepath`` (COCO's ``val2014``...), ``split``
(train / restval / val / test) and ``sentences[].raw``. Train shards get one sample per image
with every caption in ``{key}.json`` "captions" (the train pipeline draws one per visit);
eval shards get the first ``captions_per_image`` captions, the Flickr30K / MSCOCO-5K
protocol. Bad input is one ``InputError`` naming the file (or flag) and field.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainers.errors import InputError
from trainers.shards import IMAGE_EXTENSIONS, write_shard, write_shard_stats

TRAIN_SPLITS = ("train", "restval")


@dataclass(frozen=True)
class KarpathyImage:
    """One image record: its file under the image root, its split, its captions (stripped) and
    the JSON record as read (ids and file names go into the sample's metadata)."""

    path: Path
    split: str
    captions: list[str]
    record: dict[str, Any]


@dataclass(frozen=True)
class ConvertResult:
    """What ``convert_karpathy`` wrote: the shards of each split in key order and the counts."""

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
