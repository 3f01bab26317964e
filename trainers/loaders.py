"""The train and eval pipelines over img2dataset-layout shards (``trainers.shards``), built on
webdataset.

Bad samples never stop a run: they are dropped with a warning naming shard, key and reason,
and counted (a broken tar counts once, for the sample it broke in). A shard list that matches
no file, or holds no good sample at all, raises ``InputError`` naming the pattern before any
batch is drawn.
"""

from __future__ import annotations

import functools
import logging
import math
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from trainers.errors import InputError
from trainers.shards import (
    BadSample,
    SampleError,
    ShardSpec,
    describe_spec,
    expand_urls,
    iter_samples,
    iter_shard,
    parse_sample,
    require_good_sample,
)

LOG = logging.getLogger(__name__)

Preprocess = Callable[[Image.Image], torch.Tensor]
Tokenizer = Callable[[list[str]], torch.Tensor]


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
            f"shards {describe_spec(urls)}: {len(shard_urls)} shard(s) for {world_size} ranks "
            "without resampling; expected at least one shard per rank"
        )
    extra = tuple(extra_fields)
    require_good_sample(shard_urls, urls, extra)

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
    return TrainLoader(loader, state, shard_list, num_batches, describe_spec(urls))


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


def first_images(eval_set: EvalSet, count: int) -> EvalSet:
    """The eval set cut to its first ``count`` images and the captions of those images, in
    their order; ``eval_set`` itself when it has no more images than that. The tensors are
    views or copies of ``eval_set``'s: nothing is written back."""
    if len(eval_set.images) <= count:
        return eval_set
    kept = torch.nonzero(eval_set.text_to_image < count).flatten()
    return EvalSet(
        images=eval_set.images[:count],
        tokens=eval_set.tokens[kept],
        text_to_image=eval_set.text_to_image[kept],
        keys=eval_set.keys[:count],
        captions=[eval_set.captions[i] for i in kept.tolist()],
        skipped=eval_set.skipped,
    )


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
            f"eval shards {describe_spec(urls)}: no good sample in {len(shard_urls)} shard(s)"
        )
    return EvalSet(
        images=torch.stack(images),
        tokens=tokenizer(captions),
        text_to_image=torch.tensor(owners, dtype=torch.long),
        keys=keys,
        captions=captions,
        skipped=skipped,
    )
