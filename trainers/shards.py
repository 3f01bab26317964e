"""Shards in img2dataset layout: finding them, reading and validating their samples, writing
them reproducibly and checking them.

A sample is the tar members that share a key: an image (``.jpg``/``.jpeg``/``.png``/``.webp``),
a caption (``.txt``) and optionally ``.json`` metadata (``"captions": [...]`` for
multi-caption eval sets) and ``.npy`` arrays (teacher embeddings). ``parse_sample`` is the one
definition of a good sample; the loaders (``trainers.loaders``), the teacher cache and
``check_shards`` all use it, so a sample the checker passes is a sample training keeps.

Reading never raises for a bad sample: ``iter_shard`` and ``iter_samples`` yield a
``BadSample`` naming shard, key and reason in its place (a broken tar counts once, for the
sample it broke in). A shard list that matches no file raises ``InputError`` naming the pattern.

``check_shards`` also finds repeats among the good samples: a caption text owned by several
images, and the same image bytes under several keys. They are not errors, but they tie: such a
caption (or image) makes several images (or captions) equally right for one query, and recall
(``trainers.recall``) scores a tie as its expected value under a random order.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlparse

import braceexpand
import numpy as np
import webdataset as wds
from PIL import Image
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_iterator

from trainers.errors import InputError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
ShardSpec = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


# --------------------------------------------------------------------------- shard lists


def _has_scheme(url: str) -> bool:
    scheme = urlparse(url).scheme
    return len(scheme) > 1 and scheme != "file"  # len 1: a Windows drive letter


def _split_top_level(spec: str) -> list[str]:
    """Split on "::" and on commas outside braces ("a.tar,b/{0..3}.tar" -> two parts)."""
    parts: list[str] = []
    for chunk in spec.split("::"):
        if chunk.startswith("pipe:"):  # a shell command may contain commas
            parts.append(chunk)
            continue
        depth, current = 0, []
        for char in chunk:
            depth += (char == "{") - (char == "}")
            if char == "," and depth == 0:
                parts.append("".join(current))
                current = []
            else:
                current.append(char)
        parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def absolute_spec(spec: str) -> str:
    """``spec`` with every local part made absolute (``~`` expanded); URLs kept as they are.

    A trial reads its shard list in a Ray worker whose working directory is not the CLI's, so a
    relative pattern would name other files there. Parts are joined with "::", which
    ``expand_urls`` splits like the commas they may have been given with.
    """
    if not spec:
        return spec
    parts = [
        part if _has_scheme(part) else os.path.abspath(_local_pattern(part))
        for part in _split_top_level(spec)
    ]
    return "::".join(parts)


def _local_pattern(part: str) -> str:
    """A local part of a shard spec as a file-system pattern: no ``file://``, ``~`` expanded."""
    return os.path.expanduser(part.removeprefix("file://"))


def _expand_local(pattern: str) -> list[str]:
    path_pattern = _local_pattern(pattern)
    found: list[str] = []
    for candidate in braceexpand.braceexpand(path_pattern):
        if os.path.isdir(candidate):
            tars = sorted(glob.glob(os.path.join(glob.escape(candidate), "*.tar")))
            if not tars:
                raise InputError(f"shards {pattern!r}: directory {candidate} holds no .tar file")
            found += tars
        elif glob.has_magic(candidate):
            matches = sorted(m for m in glob.glob(candidate) if os.path.isfile(m))
            if not matches:
                raise InputError(f"shards {pattern!r}: glob {candidate!r} matches no file")
            found += matches
        elif os.path.isfile(candidate):
            found.append(candidate)
        else:
            raise InputError(f"shards {pattern!r}: {candidate} does not exist")
    return found


def expand_urls(spec: ShardSpec) -> list[str]:
    """Shard URLs from paths, brace patterns (``{00000..00019}``), globs, comma or ``::``
    lists, directories (every ``*.tar`` inside, sorted) and URLs (``s3://``, ``gs://``,
    ``http(s)://``, ``pipe:``; brace-expanded, passed through unchecked). Order is kept,
    duplicates dropped. ``InputError`` naming the pattern when a local part matches nothing."""
    items = [spec] if isinstance(spec, str | os.PathLike) else list(spec)
    parts = [part for item in items for part in _split_top_level(os.fspath(item))]
    if not parts:
        raise InputError(f"shards {spec!r}: empty; expected paths, brace patterns, globs or URLs")
    urls: list[str] = []
    for part in parts:
        if _has_scheme(part):
            urls += braceexpand.braceexpand(part)
        else:
            urls += _expand_local(part)
    return list(dict.fromkeys(urls))


def shard_identity(url: str, *, located: bool = False, dated: bool = True) -> str:
    """What a cache key records of one shard. For a local file: its base name (its absolute
    path when ``located``: a cache of these very files), its size and, when ``dated``, its
    mtime in ns (rewritten in place = new); the URL itself for anything not on this file
    system. The built-in teacher is keyed undated: the generator is deterministic, so a data
    set regenerated with the same settings is the same data and keeps its teacher."""
    if not os.path.exists(url):
        return url
    stat = os.stat(url)
    parts = [os.path.abspath(url) if located else os.path.basename(url), str(stat.st_size)]
    if dated:
        parts.append(str(stat.st_mtime_ns))
    return ":".join(parts)


def describe_spec(spec: ShardSpec) -> str:
    """``spec`` for an error message: the pattern, or the first of a list and how many more."""
    if isinstance(spec, str | os.PathLike):
        return repr(os.fspath(spec))
    items = [os.fspath(s) for s in spec]
    return repr(items[0]) if len(items) == 1 else f"{items[0]!r} and {len(items) - 1} more"


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class BadSample:
    """A dropped sample: where it was and why."""

    shard: str
    key: str
    reason: str

    def __str__(self) -> str:
        return f"{self.shard} {self.key}: {self.reason}"


class SampleError(ValueError):
    """Raised by ``parse_sample``; the message is the one-line reason."""


@dataclass
class Sample:
    """A good sample. ``image`` is a loaded RGB PIL image; ``captions`` has >= 1 non-empty
    string (json "captions" when present, else the .txt caption); ``arrays`` maps every
    ``.npy`` member (e.g. "teacher_image.npy") to its array."""

    key: str
    shard: str
    image: Image.Image
    captions: list[str]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def open_url(url: str) -> BinaryIO:
    """A readable binary stream: local paths and ``file://`` with ``open``; ``pipe:`` through
    webdataset's gopen; other schemes through fsspec when it has a backend for them
    (``s3://`` needs s3fs), else webdataset's gopen (``gs://`` via gsutil, http via curl)."""
    if not _has_scheme(url):
        return open(url.removeprefix("file://"), "rb")
    if url.startswith("pipe:"):
        return wds.gopen(url, "rb")
    try:
        import fsspec

        return fsspec.open(url, "rb").open()
    except (ImportError, ValueError) as error:  # no fsspec backend (s3fs, gcsfs...) installed
        if urlparse(url).scheme in wds.gopen_schemes:
            return wds.gopen(url, "rb")
        raise OSError(f"no reader for {url}: {error}") from error


class _LastMember:
    """Remembers the member tar_file_iterator is reading, so a broken tar names its key."""

    def __init__(self) -> None:
        self.name = ""

    def __call__(self, name: str) -> str:
        self.name = name
        return name


_TAR_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, ValueError)


def iter_shard(url: str) -> Iterator[dict[str, Any] | BadSample]:
    """The raw samples of one shard (dicts: ``__key__``, ``__url__`` and one bytes value per
    extension), in tar order. A shard that cannot be opened gives one ``BadSample``; a tar
    that breaks gives every sample before the break, then one ``BadSample`` for the sample
    being read when it broke (partial, so dropped)."""
    try:
        stream = open_url(url)
    except (OSError, ValueError, ImportError) as error:
        yield BadSample(url, "-", f"cannot open shard: {error}")
        return
    last = _LastMember()
    broken: list[Exception] = []

    def files() -> Iterator[dict[str, Any]]:
        # Ending the file stream cleanly (rather than raising through group_by_keys) lets it
        # hand over the complete sample it still holds.
        try:
            for item in tar_file_iterator(stream, rename_files=last):
                item["__url__"] = url
                yield item
        except _TAR_ERRORS as error:
            broken.append(error)

    finished = False
    try:
        try:
            for sample in group_by_keys(files()):
                if broken and sample["__key__"] == base_plus_ext(last.name)[0]:
                    continue
                yield sample
        except ValueError as error:  # group_by_keys: the same member twice in one sample
            broken.append(error)
        finished = True
    finally:
        try:
            stream.close()
        except OSError as error:  # a pipe: command that failed; expected when abandoned early
            if finished:
                broken.append(error)
    if broken:
        key = base_plus_ext(last.name)[0] or "-"
        # webdataset appends the stream's repr after " @ "
        detail = "; ".join(dict.fromkeys(str(e).split(" @ ")[0] for e in broken))
        where = f"truncated or corrupt tar at {last.name}" if last.name else "unreadable shard"
        yield BadSample(url, key, f"{where}: {detail}")


def _text(raw: Mapping[str, Any], ext: str) -> str | None:
    if ext not in raw:
        return None
    try:
        return raw[ext].decode("utf-8")
    except UnicodeDecodeError as error:
        raise SampleError(
            f".{ext} is not valid UTF-8 ({error.reason} at byte {error.start})"
        ) from None


def _captions(raw: Mapping[str, Any]) -> list[str]:
    text = _text(raw, "txt")
    if text is not None and not text.strip():
        raise SampleError("empty caption (.txt)")
    meta = None
    if "json" in raw:
        try:
            meta = json.loads(raw["json"].decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as error:
            raise SampleError(f"malformed .json: {error}") from None
        if not isinstance(meta, dict):
            raise SampleError(f"malformed .json: expected an object, got {type(meta).__name__}")
    if meta is not None and "captions" in meta:
        captions = meta["captions"]
        if (
            not isinstance(captions, list)
            or not captions
            or not all(isinstance(c, str) and c.strip() for c in captions)
        ):
            raise SampleError(
                'malformed .json: "captions" must be a non-empty list of non-empty strings'
            )
        return [c.strip() for c in captions]
    if text is None:
        raise SampleError('missing caption (no .txt and no "captions" in .json)')
    return [text.strip()]


def _arrays(raw: Mapping[str, Any], required: Sequence[str]) -> dict[str, np.ndarray]:
    arrays = {}
    for name, value in raw.items():
        if name.endswith("npy") and not name.startswith("__"):
            try:
                arrays[name] = np.load(io.BytesIO(value), allow_pickle=False)
            except (ValueError, OSError, EOFError) as error:
                raise SampleError(f"malformed .{name}: {error}") from None
    for name in required:
        if name not in arrays:
            raise SampleError(f"missing .{name}")
        array = arrays[name]
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.number):
            raise SampleError(
                f"malformed .{name}: expected a 1-D numeric array, got {array.dtype} {array.shape}"
            )
    return arrays


def _image_ext(raw: Mapping[str, Any]) -> str | None:
    """The member that holds a sample's image (the first of IMAGE_EXTENSIONS it has)."""
    return next((e for e in IMAGE_EXTENSIONS if e in raw), None)


def _image(raw: Mapping[str, Any]) -> Image.Image:
    ext = _image_ext(raw)
    if ext is None:
        raise SampleError(f"missing image (.{'/.'.join(IMAGE_EXTENSIONS)})")
    try:
        with Image.open(io.BytesIO(raw[ext])) as image:
            return image.convert("RGB")
    except Exception as error:  # PIL raises a zoo of types for broken files
        raise SampleError(f"undecodable image (.{ext}): {error}") from None


def parse_sample(raw: Mapping[str, Any], required_arrays: Sequence[str] = ()) -> Sample:
    """Validate and decode one raw sample; ``SampleError`` with the reason when it is bad.
    Checks, cheapest first: caption text is UTF-8 and non-empty, json parses, every ``.npy``
    loads and each of ``required_arrays`` (e.g. "teacher_image.npy") is there, the image
    decodes fully."""
    captions = _captions(raw)
    arrays = _arrays(raw, required_arrays)
    image = _image(raw)
    return Sample(raw["__key__"], raw.get("__url__", ""), image, captions, arrays)


def _iter_parsed(
    urls: Sequence[str], required_arrays: Sequence[str]
) -> Iterator[tuple[Mapping[str, Any] | None, Sample | BadSample]]:
    """``iter_samples``, each item with the raw sample it came from (None for a shard or tar
    error, which has no sample)."""
    for url in urls:
        for raw in iter_shard(url):
            if isinstance(raw, BadSample):
                yield None, raw
                continue
            try:
                yield raw, parse_sample(raw, required_arrays)
            except SampleError as error:
                yield raw, BadSample(url, raw["__key__"], str(error))


def iter_samples(
    urls: Sequence[str], required_arrays: Sequence[str] = ()
) -> Iterator[Sample | BadSample]:
    """Every sample of ``urls`` in order: a ``Sample`` or a ``BadSample`` for each one."""
    for _, item in _iter_parsed(urls, required_arrays):
        yield item


# --------------------------------------------------------------------------- writing


def tar_writer(stream: Any) -> wds.TarWriter:
    """A TarWriter for shards every loader reads: raw bytes per extension (no encoding),
    fixed owner, mode and mtime, and plain ustar headers. Tar's default here is pax, whose
    extra header per member (for a fractional mtime) makes reading a member about twice the
    work; img2dataset's names fit ustar."""
    writer = wds.TarWriter(stream, user="", group="", mode=0o644, encoder=False, mtime=0.0)
    # TarWriter accepts a format but does not pass it on.
    writer.tarstream.format = tarfile.USTAR_FORMAT
    return writer


def write_shard(path: Path, samples: Iterable[Mapping[str, Any]]) -> int:
    """Write ``samples`` (``__key__`` plus extension -> bytes) as one tar, reproducibly (fixed
    mtime and owner, members sorted by extension) and atomically (a partial shard never
    carries the final name). Returns the sample count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    count = 0
    with open(tmp, "wb") as stream, tar_writer(stream) as writer:
        for sample in samples:
            writer.write(dict(sample))
            count += 1
    tmp.replace(path)
    return count


def write_shard_stats(shard: Path, count: int, extra: Mapping[str, Any] | None = None) -> Path:
    """img2dataset's ``NNNNN_stats.json`` next to ``NNNNN.tar``."""
    stats = {
        "count": count,
        "successes": count,
        "failed_to_download": 0,
        "failed_to_resize": 0,
        "status_dict": {"success": count},
        **(extra or {}),
    }
    path = shard.with_name(shard.name.removesuffix(".tar") + "_stats.json")
    path.write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    return path


# --------------------------------------------------------------------------- checking


@dataclass(frozen=True)
class ShardCount:
    shard: str
    good: int
    bad: int


# Repeats a check report names by their samples' keys, at most this many.
REPEAT_EXAMPLES = 3


@dataclass(frozen=True)
class RepeatedCaptions:
    """Caption texts (whitespace stripped) owned by more than one image among good samples.

    ``texts``: how many such texts; ``captions``: the captions carrying one (each image's
    copies counted); ``images_all_shared``: images whose every caption is such a text (no
    caption of theirs names them alone); ``examples``: up to REPEAT_EXAMPLES of (text, how
    many images own it, the keys of the first REPEAT_EXAMPLES of them)."""

    texts: int = 0
    captions: int = 0
    images_all_shared: int = 0
    examples: tuple[tuple[str, int, tuple[str, ...]], ...] = ()


@dataclass(frozen=True)
class RepeatedImages:
    """Identical image bytes (sha1) under more than one key among good samples.

    ``groups``: how many such contents; ``images``: the samples that hold one; ``examples``: up
    to REPEAT_EXAMPLES of (how many samples share one content, the keys of the first
    REPEAT_EXAMPLES of them)."""

    groups: int = 0
    images: int = 0
    examples: tuple[tuple[int, tuple[str, ...]], ...] = ()


@dataclass(frozen=True)
class CheckReport:
    shards: list[ShardCount]
    bad: list[BadSample]
    repeated_captions: RepeatedCaptions = RepeatedCaptions()
    repeated_images: RepeatedImages = RepeatedImages()

    @property
    def ok(self) -> bool:
        """No bad sample; repeats are warnings and do not count."""
        return not self.bad


class _Repeats:
    """Collects every good sample's captions and image digest, then names the repeats."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.captions: list[list[str]] = []
        self.owners: dict[str, list[int]] = {}  # caption text -> images owning it, in order
        self.contents: dict[bytes, list[int]] = {}  # image sha1 -> images holding it

    def add(self, sample: Sample, image_bytes: bytes) -> None:
        image = len(self.keys)
        self.keys.append(sample.key)
        self.captions.append(sample.captions)
        for text in dict.fromkeys(sample.captions):
            self.owners.setdefault(text, []).append(image)
        self.contents.setdefault(hashlib.sha1(image_bytes).digest(), []).append(image)

    def captions_report(self) -> RepeatedCaptions:
        shared = {text: images for text, images in self.owners.items() if len(images) > 1}
        captions = sum(text in shared for texts in self.captions for text in texts)
        all_shared = sum(all(text in shared for text in texts) for texts in self.captions)
        examples = tuple(
            (text, *self._example(images))
            for text, images in list(shared.items())[:REPEAT_EXAMPLES]
        )
        return RepeatedCaptions(len(shared), captions, all_shared, examples)

    def images_report(self) -> RepeatedImages:
        groups = [images for images in self.contents.values() if len(images) > 1]
        examples = tuple(self._example(images) for images in groups[:REPEAT_EXAMPLES])
        return RepeatedImages(len(groups), sum(map(len, groups)), examples)

    def _example(self, images: list[int]) -> tuple[int, tuple[str, ...]]:
        return len(images), tuple(self.keys[i] for i in images[:REPEAT_EXAMPLES])


def check_shards(
    spec: ShardSpec, required_arrays: Sequence[str] = (), progress: bool = False
) -> CheckReport:
    """Read every sample of every shard with ``parse_sample``; per-shard counts, each bad
    sample, and the repeated captions and images among the good ones (``RepeatedCaptions``,
    ``RepeatedImages``). ``InputError`` when ``spec`` matches nothing."""
    from tqdm import tqdm

    urls = expand_urls(spec)
    counts, bad = [], []
    repeats = _Repeats()
    for url in tqdm(urls, unit="shard", desc="check", disable=not progress):
        good = broken = 0
        for raw, item in _iter_parsed([url], required_arrays):
            if isinstance(item, BadSample):
                bad.append(item)
                broken += 1
            else:
                good += 1
                repeats.add(item, raw[_image_ext(raw)])
        counts.append(ShardCount(url, good, broken))
    return CheckReport(counts, bad, repeats.captions_report(), repeats.images_report())


def require_good_sample(
    urls: Sequence[str], spec: ShardSpec, required_arrays: Sequence[str]
) -> None:
    """``InputError`` naming ``spec`` when no sample of ``urls`` (its expansion) is good, so a
    loader fails now rather than after a silent endless resampling loop. Reads until the first
    good sample: one sample on healthy data."""
    bad: list[BadSample] = []
    for item in iter_samples(urls, required_arrays):
        if isinstance(item, Sample):
            return
        bad.append(item)
    example = f"; first: {bad[0]}" if bad else " (the shards are empty)"
    raise InputError(
        f"shards {describe_spec(spec)}: no good sample in {len(urls)} shard(s), "
        f"{len(bad)} bad{example}"
    )
