"""Shards in img2dataset layout: finding, reading, checking and writing them, and the train
and eval pipelines built on webdataset.

A sample is the tar members that share a key: an image (``.jpg``/``.jpeg``/``.png``/``.webp``),
a caption (``.txt``) and optionally ``.json`` metadata (``"captions": [...]`` for
multi-caption eval sets) and ``.npy`` arrays (teacher embeddings). ``parse_sample`` is the one
definition of a good sample; training, eval loading and ``check_shards`` all use it, so a
sample the checker passes is a sample training keeps.

Bad samples never stop a run: they are dropped with a warning naming shard, key and reason,
and counted (a broken tar counts once, for the sample it broke in). A shard list that matches
no file, or holds no good sample at all, raises ``InputError`` naming the pattern before any
batch is drawn.
"""

from __future__ import annotations

import functools
import glob
import io
import json
import logging
import math
import os
import random
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlparse

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_iterator

from trainers.errors import InputError

LOG = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
ShardSpec = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
Preprocess = Callable[[Image.Image], torch.Tensor]
Tokenizer = Callable[[list[str]], torch.Tensor]


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


def _expand_local(pattern: str) -> list[str]:
    path_pattern = os.path.expanduser(pattern.removeprefix("file://"))
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


def _describe(spec: ShardSpec) -> str:
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


def _image(raw: Mapping[str, Any]) -> Image.Image:
    ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
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


def iter_samples(
    urls: Sequence[str], required_arrays: Sequence[str] = ()
) -> Iterator[Sample | BadSample]:
    """Every sample of ``urls`` in order: a ``Sample`` or a ``BadSample`` for each one."""
    for url in urls:
        for raw in iter_shard(url):
            if isinstance(raw, BadSample):
                yield raw
                continue
            try:
                yield parse_sample(raw, required_arrays)
            except SampleError as error:
                yield BadSample(url, raw["__key__"], str(error))


# --------------------------------------------------------------------------- writing


def write_shard(path: Path, samples: Iterable[Mapping[str, Any]]) -> int:
    """Write ``samples`` (``__key__`` plus extension -> bytes) as one tar, reproducibly (fixed
    mtime and owner, members sorted by extension) and atomically (a partial shard never
    carries the final name). Returns the sample count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    count = 0
    with open(tmp, "wb") as stream:
        writer = wds.TarWriter(stream, user="", group="", mode=0o644, encoder=False, mtime=0.0)
        # TarWriter accepts a format but does not pass it on; plain ustar headers are smaller
        # and faster than pax, and img2dataset's names fit them.
        writer.tarstream.format = tarfile.USTAR_FORMAT
        with writer:
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


@dataclass(frozen=True)
class CheckReport:
    shards: list[ShardCount]
    bad: list[BadSample]

    @property
    def ok(self) -> bool:
        return not self.bad


def check_shards(
    spec: ShardSpec, required_arrays: Sequence[str] = (), progress: bool = False
) -> CheckReport:
    """Read every sample of every shard with ``parse_sample``; per-shard counts and each bad
    sample. ``InputError`` when ``spec`` matches nothing."""
    from tqdm import tqdm

    urls = expand_urls(spec)
    counts, bad = [], []
    for url in tqdm(urls, unit="shard", desc="check", disable=not progress):
        good = broken = 0
        for item in iter_samples([url], required_arrays):
            if isinstance(item, BadSample):
                bad.append(item)
                broken += 1
            else:
                good += 1
        counts.append(ShardCount(url, good, broken))
    return CheckReport(counts, bad)


def _require_good_sample(
    urls: Sequence[str], spec: ShardSpec, required_arrays: Sequence[str]
) -> None:
    """Fail now, not after a silent endless resampling loop, when no shard has a good sample.
    Reads until the first good sample: one sample on healthy data."""
    bad: list[BadSample] = []
    for item in iter_samples(urls, required_arrays):
        if isinstance(item, Sample):
            return
        bad.append(item)
    example = f"; first: {bad[0]}" if bad else " (the shards are empty)"
    raise InputError(
        f"shards {_describe(spec)}: no good sample in {len(urls)} shard(s), {len(bad)} bad{example}"
    )


# --------------------------------------------------------------------------- train pipeline


def _worker_id() -> int:
    info = torch.utils.data.get_worker_info()
    return 0 if info is None else info.id


def _mix(*values: int) -> int:
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1)[0])


@dataclass
class _WorkerState:
    """State shared by the stages of one copy of the pipeline: each DataLoader worker gets
    its own copy, so counts are per worker and seeds can include the worker id."""

    seed: int
    rank: int
    epoch: int = 0
    pending_skipped: int = 0

    def stream_seed(self, purpose: int) -> int:
        return _mix(self.seed, self.rank, _worker_id(), self.epoch, purpose)

    def resample_seed(self) -> int:
        return self.stream_seed(0)

    def skip(self, bad: BadSample) -> None:
        self.pending_skipped += 1
        LOG.warning("skipping bad sample %s", bad)

    def take_skipped(self) -> int:
        count, self.pending_skipped = self.pending_skipped, 0
        return count


class _ReadShards(wds.PipelineStage):
    def __init__(self, state: _WorkerState) -> None:
        self.state = state

    def run(self, shards: Iterable[Mapping[str, Any]]) -> Iterator[dict[str, Any]]:
        for shard in shards:
            for raw in iter_shard(shard["url"]):
                if isinstance(raw, BadSample):
                    self.state.skip(raw)
                else:
                    yield raw


class _Shuffle(wds.PipelineStage):
    def __init__(self, state: _WorkerState, size: int) -> None:
        self.state, self.size = state, size

    def run(self, samples: Iterable[Any]) -> Iterable[Any]:
        if self.size <= 1:
            return samples
        rng = random.Random(self.state.stream_seed(1))
        return wds.shuffle(self.size, initial=self.size, rng=rng)(iter(samples))


class _Decode(wds.PipelineStage):
    def __init__(
        self, state: _WorkerState, preprocess: Preprocess, extra_fields: Sequence[str]
    ) -> None:
        self.state, self.preprocess, self.extra_fields = state, preprocess, tuple(extra_fields)

    def run(self, raws: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        rng = random.Random(self.state.stream_seed(2))
        for raw in raws:
            try:
                sample = parse_sample(raw, self.extra_fields)
                arrays = {
                    name: sample.arrays[name].astype(np.float32) for name in self.extra_fields
                }
            except SampleError as error:
                self.state.skip(BadSample(raw.get("__url__", ""), raw["__key__"], str(error)))
                continue
            yield {
                "key": sample.key,
                "image": self.preprocess(sample.image),
                "caption": sample.captions[rng.randrange(len(sample.captions))],
                **arrays,
            }


def _field_name(extension: str) -> str:
    return extension.split(".", 1)[0]


class _Batch(wds.PipelineStage):
    def __init__(
        self,
        state: _WorkerState,
        batch_size: int,
        tokenizer: Tokenizer,
        extra_fields: Sequence[str],
        partial: bool,
    ) -> None:
        self.state, self.batch_size, self.tokenizer = state, batch_size, tokenizer
        self.extra_fields, self.partial = tuple(extra_fields), partial

    def run(self, samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for group in wds.batched(self.batch_size, collation_fn=None, partial=self.partial)(
            iter(samples)
        ):
            batch = {
                "image": torch.stack([s["image"] for s in group]),
                "text": self.tokenizer([s["caption"] for s in group]),
                "key": [s["key"] for s in group],
                "skipped": self.state.take_skipped(),
            }
            for name in self.extra_fields:
                batch[_field_name(name)] = torch.from_numpy(np.stack([s[name] for s in group]))
            yield batch
        if self.state.pending_skipped:  # bad samples after this worker's last batch
            yield {"key": [], "skipped": self.state.take_skipped()}


def _split_by_rank(shards: Iterable[Any], rank: int, world_size: int) -> Iterator[Any]:
    for index, shard in enumerate(shards):
        if index % world_size == rank:
            yield shard


class TrainLoader:
    """Batches for one rank. Each batch: "image" float (B, 3, H, W) from ``preprocess``,
    "text" long (B, ctx) from ``tokenizer``, "key" list[str], "skipped" int (bad samples the
    producing worker dropped since its previous batch; summed over batches and ranks it is the
    exact number of bad samples read), and one float (B, d) tensor per extra field, named without
    extension ("teacher_image.npy" -> "teacher_image").

    Resampled (default): ``len(self)`` full batches per epoch on every rank, whatever the
    shards' sizes. Otherwise: one pass over this rank's share of the shards, last batch of
    each worker possibly short. Each ``iter()`` is one epoch; ``set_epoch`` picks it (seeds
    depend on seed, rank, worker and epoch).
    """

    def __init__(
        self,
        loader: wds.WebLoader,
        state: _WorkerState,
        shard_list: wds.ResampledShards | wds.SimpleShardList,
        num_batches: int | None,
        description: str,
    ) -> None:
        self._loader, self._state, self._shard_list = loader, state, shard_list
        self._num_batches, self._description = num_batches, description
        self._epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def __len__(self) -> int:
        if self._num_batches is None:
            raise TypeError("a single-pass TrainLoader (resampled=False) has no fixed length")
        return self._num_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # Set before the DataLoader copies the pipeline into its workers for this epoch.
        self._state.epoch = self._epoch
        if isinstance(self._shard_list, wds.ResampledShards):
            # It counts its own epochs, but only where it runs (the main process when
            # num_workers=0, fresh worker copies otherwise); pin it so seeds come from ours.
            self._shard_list.epoch = -1
        else:
            self._shard_list.seed = _mix(self._state.seed, self._epoch)
        self._epoch += 1
        # One batch is held back so that a worker's closing count (a batch with no keys, see
        # _Batch) still lands on a batch the caller sees: the per-batch counts sum exactly.
        held: dict[str, Any] | None = None
        carry = 0
        for batch in self._loader:
            if not batch["key"]:
                if held is None:
                    carry += batch["skipped"]
                else:
                    held["skipped"] += batch["skipped"]
                continue
            batch["skipped"] += carry
            carry = 0
            if held is not None:
                yield held
            held = batch
        if held is None:
            raise InputError(
                f"shards {self._description}: rank {self._state.rank} got no good sample this epoch"
            )
        yield held


def make_train_loader(
    urls: ShardSpec,
    preprocess: Preprocess,
    tokenizer: Tokenizer,
    batch_size: int,
    samples_per_epoch: int,
    seed: int = 0,
    num_workers: int = 0,
    shuffle_buffer: int = 1000,
    rank: int = 0,
    world_size: int = 1,
    extra_fields: Sequence[str] = (),
    resampled: bool = True,
) -> TrainLoader:
    """The training pipeline over ``urls`` (see ``expand_urls``); batches as ``TrainLoader``.

    ``samples_per_epoch`` counts all ranks together: every rank yields
    ceil(samples_per_epoch / (batch_size * world_size)) batches per epoch (resampled mode;
    ignored when ``resampled=False``). Shards are drawn with replacement per rank and worker
    with distinct seeds, so ranks never wait on uneven shards and fewer shards than workers
    works. ``shuffle_buffer`` raw samples are shuffled before decoding. Raises ``InputError``
    now when ``urls`` matches nothing or holds no good sample.
    """
    for name, value in (("batch_size", batch_size), ("samples_per_epoch", samples_per_epoch)):
        if value < 1:
            raise InputError(f"make_train_loader: {name}={value}; expected a positive integer")
    if not 0 <= rank < world_size:
        raise InputError(
            f"make_train_loader: rank={rank}, world_size={world_size}; "
            "expected 0 <= rank < world_size"
        )
    shard_urls = expand_urls(urls)
    if not resampled and len(shard_urls) < world_size:
        raise InputError(
            f"shards {_describe(urls)}: {len(shard_urls)} shard(s) for {world_size} ranks without "
            "resampling; expected at least one shard per rank"
        )
    extra = tuple(extra_fields)
    _require_good_sample(shard_urls, urls, extra)

    state = _WorkerState(seed=seed, rank=rank)
    shard_list: wds.ResampledShards | wds.SimpleShardList
    if resampled:
        shard_list = wds.ResampledShards(
            shard_urls, seed=seed, worker_seed=state.resample_seed, deterministic=True
        )
        source: list[Any] = [shard_list]
    else:
        shard_list = wds.SimpleShardList(shard_urls, seed=seed)
        source = [
            shard_list,
            functools.partial(_split_by_rank, rank=rank, world_size=world_size),
            wds.split_by_worker,
        ]
    dataset = wds.DataPipeline(
        *source,
        _ReadShards(state),
        _Shuffle(state, shuffle_buffer),
        _Decode(state, preprocess, extra),
        _Batch(state, batch_size, tokenizer, extra, partial=not resampled),
    )
    num_batches = None
    if resampled:
        num_batches = math.ceil(samples_per_epoch / (batch_size * world_size))
        dataset = dataset.with_epoch(math.ceil(num_batches / max(num_workers, 1)))
    loader = wds.WebLoader(
        dataset, batch_size=None, num_workers=num_workers, persistent_workers=False
    )
    if num_batches is not None:
        loader = loader.with_epoch(num_batches)
    return TrainLoader(loader, state, shard_list, num_batches, _describe(urls))


# --------------------------------------------------------------------------- eval sets


@dataclass(frozen=True)
class EvalSet:
    """A retrieval eval set. ``images`` float (N_img, 3, H, W) from ``preprocess``; ``tokens``
    long (N_txt, ctx); ``text_to_image`` long (N_txt,): index into ``images`` of each
    caption's image; ``keys`` (N_img) sample keys; ``captions`` (N_txt) in ``tokens`` order;
    ``skipped``: bad samples dropped (each warned about)."""

    images: torch.Tensor
    tokens: torch.Tensor
    text_to_image: torch.Tensor
    keys: list[str]
    captions: list[str]
    skipped: int = 0


def load_eval_set(urls: ShardSpec, preprocess: Preprocess, tokenizer: Tokenizer) -> EvalSet:
    """All samples of ``urls`` in shard order; each image's captions are its json "captions"
    list, else its .txt caption. ``InputError`` when nothing matches or no sample is good."""
    shard_urls = expand_urls(urls)
    images, keys, captions, owners = [], [], [], []
    skipped = 0
    for item in iter_samples(shard_urls):
        if isinstance(item, BadSample):
            skipped += 1
            LOG.warning("skipping bad eval sample %s", item)
            continue
        owners += [len(keys)] * len(item.captions)
        captions += item.captions
        keys.append(item.key)
        images.append(preprocess(item.image))
    if not images:
        raise InputError(
            f"eval shards {_describe(urls)}: no good sample in {len(shard_urls)} shard(s)"
        )
    return EvalSet(
        images=torch.stack(images),
        tokens=tokenizer(captions),
        text_to_image=torch.tensor(owners, dtype=torch.long),
        keys=keys,
        captions=captions,
        skipped=skipped,
    )
