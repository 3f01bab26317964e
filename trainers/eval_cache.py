"""The eval set decoded and preprocessed once, then read by every trial that preprocesses alike.

Decoding 1k images and tokenizing 5k captions costs a trial about 1.5 s of its set-up on two
cores, and every trial of an ablation used to pay it again for identical tensors. The first
trial writes them under ``<cache_dir>/<key>/`` and the others memory-map them (``torch.load``
with ``mmap=True``: one copy in the page cache for all trials on a node). The key covers what
changes the tensors: each shard's name, size and modification time, the image transform (its
``repr``, which lists sizes, interpolation, mean and std) and the tokenizer (type and context
length). A write goes to a temporary folder renamed into place, so concurrent trials never
read a half-written set; the loser of a race keeps its own copy and discards it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from trainers.loaders import EvalSet, Preprocess, Tokenizer, load_eval_set
from trainers.shards import ShardSpec, expand_urls, shard_identity

TENSORS_FILE = "eval_set.pt"
TEXT_FILE = "eval_set.json"


def eval_cache_key(urls: ShardSpec, preprocess: Preprocess, tokenizer: Tokenizer) -> str:
    transform = re.sub(r" at 0x[0-9a-fA-F]+", "", repr(preprocess))  # function addresses vary
    tokens = f"{type(tokenizer).__name__}:{getattr(tokenizer, 'context_length', None)}"
    shards = [shard_identity(url) for url in expand_urls(urls)]
    text = json.dumps({"shards": shards, "transform": transform, "tokenizer": tokens})
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_eval_set_cached(
    urls: ShardSpec, preprocess: Preprocess, tokenizer: Tokenizer, cache_dir: str | Path | None
) -> EvalSet:
    """``load_eval_set``, read from (or first written to) ``cache_dir`` when one is given.
    The returned tensors of a cached set are memory-mapped and must not be written to."""
    if cache_dir is None:
        return load_eval_set(urls, preprocess, tokenizer)
    directory = Path(cache_dir) / eval_cache_key(urls, preprocess, tokenizer)
    if (directory / TEXT_FILE).is_file() and (directory / TENSORS_FILE).is_file():
        return _read(directory)
    eval_set = load_eval_set(urls, preprocess, tokenizer)
    _write(directory, eval_set)
    return eval_set


def _read(directory: Path) -> EvalSet:
    tensors = torch.load(directory / TENSORS_FILE, mmap=True, weights_only=True)
    text = json.loads((directory / TEXT_FILE).read_text())
    return EvalSet(
        images=tensors["images"],
        tokens=tensors["tokens"],
        text_to_image=tensors["text_to_image"],
        keys=text["keys"],
        captions=text["captions"],
        skipped=text["skipped"],
    )


def _write(directory: Path, eval_set: EvalSet) -> None:
    directory.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        torch.save(
            {
                "images": eval_set.images.contiguous(),
                "tokens": eval_set.tokens.contiguous(),
                "text_to_image": eval_set.text_to_image.contiguous(),
            },
            partial / TENSORS_FILE,
        )
        text = {"keys": eval_set.keys, "captions": eval_set.captions, "skipped": eval_set.skipped}
        (partial / TEXT_FILE).write_text(json.dumps(text))
        with contextlib.suppress(OSError):  # another trial renamed its copy first: keep that
            os.rename(partial, directory)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
