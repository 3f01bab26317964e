"""The shared eval-set cache returns exactly what decoding the shards returns, decodes once,
and never serves a set made with other preprocessing or from other shard contents."""

from __future__ import annotations

import os

import pytest
import torch

from trainers import eval_cache
from trainers.loaders import load_eval_set
from trainers.models import build_student


@pytest.fixture(scope="module")
def student_io():
    _, loaded = build_student("conaclip-student-xs", teacher_embed_dim=None)
    return loaded.preprocess_eval, loaded.tokenizer


def test_cached_set_equals_the_decoded_one_and_is_decoded_once(
    tiny_shapes, student_io, tmp_path, monkeypatch
):
    preprocess, tokenizer = student_io
    shards = str(tiny_shapes.out_dir / "eval")
    direct = load_eval_set(shards, preprocess, tokenizer)
    first = eval_cache.load_eval_set_cached(shards, preprocess, tokenizer, tmp_path)
    (entry,) = [p for p in tmp_path.iterdir()]  # one entry, no partial folder left behind
    assert entry.name == eval_cache.eval_cache_key(shards, preprocess, tokenizer)

    def no_decoding(*args, **kwargs):
        raise AssertionError("the cached set was decoded again")

    monkeypatch.setattr(eval_cache, "load_eval_set", no_decoding)
    again = eval_cache.load_eval_set_cached(shards, preprocess, tokenizer, tmp_path)
    for loaded in (first, again):
        assert torch.equal(loaded.images, direct.images)
        assert torch.equal(loaded.tokens, direct.tokens)
        assert torch.equal(loaded.text_to_image, direct.text_to_image)
        assert (loaded.keys, loaded.captions, loaded.skipped) == (
            direct.keys, direct.captions, direct.skipped
        )  # fmt: skip
    assert direct.images.shape[0] == 60 and direct.tokens.shape[0] == len(direct.captions)


def test_key_follows_preprocessing_and_shard_contents(tiny_shapes, student_io, tmp_path):
    preprocess, tokenizer = student_io
    shards = str(tiny_shapes.out_dir / "eval")
    key = eval_cache.eval_cache_key(shards, preprocess, tokenizer)
    # Built again in another object: the same transform gives the same key (no addresses).
    _, rebuilt = build_student("conaclip-student-xs", teacher_embed_dim=None)
    assert eval_cache.eval_cache_key(shards, rebuilt.preprocess_eval, rebuilt.tokenizer) == key
    # Another image size (a 224 px transform) is another entry.
    from torchvision import transforms

    wider = transforms.Compose([transforms.Resize(224), transforms.ToTensor()])
    assert eval_cache.eval_cache_key(shards, wider, tokenizer) != key
    # A rewritten shard (new modification time) is another entry.
    shard = sorted((tiny_shapes.out_dir / "eval").glob("*.tar"))[0]
    stat = shard.stat()
    try:
        os.utime(shard, (stat.st_atime, stat.st_mtime + 10))
        assert eval_cache.eval_cache_key(shards, preprocess, tokenizer) != key
    finally:
        os.utime(shard, (stat.st_atime, stat.st_mtime))
