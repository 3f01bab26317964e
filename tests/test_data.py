"""Shard lists, sample validation, the train and eval pipelines. Shards are built here, each
corruption by hand, and expected values are worked out from what was written."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import tarfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision import transforms

from trainers.errors import InputError
from trainers.loaders import first_images, load_eval_set, make_train_loader
from trainers.shards import (
    BadSample,
    SampleError,
    absolute_spec,
    check_shards,
    expand_urls,
    iter_shard,
    parse_sample,
    shard_identity,
    write_shard,
)

TOKENIZER = open_clip.get_tokenizer("ViT-B-32")
TO_TENSOR = transforms.ToTensor()  # exact: uint8 / 255, so expected pixels are hand-computable


def image_bytes(rgb: tuple[int, int, int], fmt: str = "PNG", size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buffer, fmt)
    return buffer.getvalue()


def colour_of(index: int) -> tuple[int, int, int]:
    return (index * 7 % 256, index * 13 % 256, index * 29 % 256)


def good(index: int, **members: bytes) -> dict:
    sample = {
        "__key__": f"{index:08d}",
        "png": image_bytes(colour_of(index)),
        "txt": f"caption number {index}".encode(),
    }
    sample.update(members)
    return sample


def make_shard(path: Path, samples: list[dict]) -> str:
    write_shard(path, samples)
    return str(path)


# --------------------------------------------------------------------------- expand_urls


@pytest.fixture
def three_shards(tmp_path) -> list[str]:
    return [make_shard(tmp_path / "s" / f"{i:05d}.tar", [good(i)]) for i in range(3)]


def test_expand_urls_patterns(tmp_path, three_shards):
    root = tmp_path / "s"
    (root / "00000_stats.json").write_text("{}")
    assert expand_urls(f"{root}/{{00000..00002}}.tar") == three_shards
    assert expand_urls(f"{root}/*.tar") == three_shards
    assert expand_urls(root) == three_shards  # a directory: its .tar files, sorted
    assert expand_urls(f"{root}/00002.tar,{root}/{{00000..00001}}.tar") == [
        three_shards[2],
        three_shards[0],
        three_shards[1],
    ]
    assert expand_urls(f"{root}/00001.tar::{root}/00001.tar") == [three_shards[1]]
    assert expand_urls([f"file://{three_shards[0]}", Path(three_shards[1])]) == three_shards[:2]


def test_shard_identity_names_size_and_mtime_and_changes_when_rewritten(tmp_path):
    shard = tmp_path / "00000.tar"
    shard.write_bytes(b"x" * 10)
    os.utime(shard, ns=(1_000_000_000_123, 1_000_000_000_123))
    assert shard_identity(str(shard)) == "00000.tar:10:1000000000123"
    assert shard_identity(str(shard), dated=False) == "00000.tar:10"
    assert shard_identity(str(shard), located=True) == f"{shard.resolve()}:10:1000000000123"
    os.utime(shard, ns=(2_000_000_000_000, 2_000_000_000_000))  # rewritten in place
    assert shard_identity(str(shard)) == "00000.tar:10:2000000000000"
    assert shard_identity(str(shard), dated=False) == "00000.tar:10"
    assert shard_identity("s3://bucket/00000.tar", located=True) == "s3://bucket/00000.tar"


def test_expand_urls_passes_remote_urls_through():
    assert expand_urls("s3://bucket/train-{000..002}.tar") == [
        "s3://bucket/train-000.tar",
        "s3://bucket/train-001.tar",
        "s3://bucket/train-002.tar",
    ]
    assert expand_urls(["gs://b/x.tar", "pipe:aws s3 cp s3://b/{0..1}.tar -"]) == [
        "gs://b/x.tar",
        "pipe:aws s3 cp s3://b/0.tar -",
        "pipe:aws s3 cp s3://b/1.tar -",
    ]


def test_absolute_spec_anchors_local_parts_where_they_were_given(
    tmp_path, three_shards, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    spec = "s/00002.tar,s/{00000..00001}.tar::s3://b/x-{0..1}.tar"
    absolute = absolute_spec(spec)
    assert (
        absolute
        == f"{tmp_path}/s/00002.tar::{tmp_path}/s/{{00000..00001}}.tar::s3://b/x-{{0..1}}.tar"
    )
    # Elsewhere (a Ray worker's own folder) the absolute spec still names the same shards.
    monkeypatch.chdir(tmp_path / "s")
    assert expand_urls(absolute) == [
        three_shards[2], three_shards[0], three_shards[1], "s3://b/x-0.tar", "s3://b/x-1.tar"
    ]  # fmt: skip
    assert absolute_spec(absolute) == absolute
    assert absolute_spec("pipe:aws s3 cp s3://b/{0,1}.tar -") == "pipe:aws s3 cp s3://b/{0,1}.tar -"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert absolute_spec("~/s/*.tar") == f"{tmp_path}/s/*.tar"
    assert absolute_spec(f"file://{tmp_path}/s") == f"{tmp_path}/s"
    assert absolute_spec("") == ""


@pytest.mark.parametrize(
    "pattern",
    ["nothing/*.tar", "nothing/{00000..00003}.tar", "missing.tar", "emptydir", ""],
)
def test_expand_urls_names_the_pattern_that_matches_nothing(tmp_path, pattern):
    (tmp_path / "emptydir").mkdir()
    spec = str(tmp_path / pattern) if pattern else []
    with pytest.raises(InputError, match="shards") as error:
        expand_urls(spec)
    if pattern:
        assert pattern.split("/")[0] in str(error.value)
    assert "\n" not in str(error.value)


# --------------------------------------------------------------------------- samples

TRUNCATED_JPEG = image_bytes((200, 10, 10), "JPEG", size=64)[:300]
CORRUPTIONS = {
    # name: (members to set or None to delete, expected reason fragment)
    "corrupt image": ({"png": b"\x89PNG\r\n\x1a\n garbage"}, "undecodable image (.png)"),
    "truncated jpeg": ({"png": None, "jpg": TRUNCATED_JPEG}, "undecodable image (.jpg)"),
    "no image": ({"png": None}, "missing image"),
    "empty caption": ({"txt": b"  \n"}, "empty caption"),
    "bad utf-8": ({"txt": b"caption \xff\xfe"}, ".txt is not valid UTF-8"),
    "malformed json": ({"json": b'{"captions": ["a",'}, "malformed .json"),
    "json captions not strings": ({"json": b'{"captions": ["ok", 3]}'}, '"captions" must be'),
    "no caption": ({"txt": None}, "missing caption"),
    "bad npy": ({"teacher_image.npy": b"\x93NUMPY broken"}, "malformed .teacher_image.npy"),
}


def corrupted(index: int, name: str) -> dict:
    sample = good(index)
    for member, value in CORRUPTIONS[name][0].items():
        if value is None:
            sample.pop(member, None)
        else:
            sample[member] = value
    return sample


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_parse_sample_gives_the_reason(name):
    raw = {k: v for k, v in corrupted(3, name).items()}
    with pytest.raises(SampleError) as error:
        parse_sample(raw)
    assert CORRUPTIONS[name][1] in str(error.value)


def test_parse_sample_reads_captions_and_arrays():
    vector = np.arange(4, dtype=np.float16)
    buffer = io.BytesIO()
    np.save(buffer, vector)
    raw = good(5, json=b'{"captions": [" one ", "two"]}', **{"teacher_text.npy": buffer.getvalue()})
    sample = parse_sample(raw, required_arrays=["teacher_text.npy"])
    assert sample.captions == ["one", "two"]  # json list wins over .txt, stripped
    assert np.array_equal(sample.arrays["teacher_text.npy"], vector)
    assert np.asarray(sample.image).tolist()[0][0] == list(colour_of(5))
    assert parse_sample(good(6)).captions == ["caption number 6"]
    with pytest.raises(SampleError, match=r"missing \.teacher_image\.npy"):
        parse_sample(good(7), required_arrays=["teacher_image.npy"])


def truncated_shard(path: Path, count: int, cut_in: str) -> str:
    """A tar of ``count`` good samples cut 10 bytes into member ``cut_in``'s data."""
    make_shard(path, [good(i) for i in range(count)])
    with tarfile.open(path) as tar:
        offset = tar.getmember(cut_in).offset_data
    path.write_bytes(path.read_bytes()[: offset + 10])
    return str(path)


def test_truncated_tar_keeps_what_came_before_and_counts_one(tmp_path):
    url = truncated_shard(tmp_path / "t.tar", 5, "00000002.png")
    items = list(iter_shard(url))
    assert [i["__key__"] for i in items[:2]] == ["00000000", "00000001"]
    assert len(items) == 3 and isinstance(items[2], BadSample)
    assert (items[2].shard, items[2].key) == (url, "00000002")
    assert "truncated" in items[2].reason


# --------------------------------------------------------------------------- a corrupt data set


@pytest.fixture
def corrupt_set(tmp_path) -> tuple[list[str], dict[tuple[str, str], str]]:
    """Two shards: every corruption once among good samples, plus a truncated third shard.
    Returns (urls, {(shard, key): reason fragment})."""
    names = sorted(CORRUPTIONS)
    first = [good(0), *(corrupted(1 + i, n) for i, n in enumerate(names[:4])), good(5)]
    second = [good(10), *(corrupted(11 + i, n) for i, n in enumerate(names[4:])), good(19)]
    urls = [
        make_shard(tmp_path / "c" / "00000.tar", first),
        make_shard(tmp_path / "c" / "00001.tar", second),
    ]
    urls.append(truncated_shard(tmp_path / "c" / "00002.tar", 4, "00000003.txt"))
    expected_bad = {(urls[0], f"{1 + i:08d}"): CORRUPTIONS[n][1] for i, n in enumerate(names[:4])}
    expected_bad |= {(urls[1], f"{11 + i:08d}"): CORRUPTIONS[n][1] for i, n in enumerate(names[4:])}
    expected_bad[(urls[2], "00000003")] = "truncated"
    return urls, expected_bad


def test_check_shards_lists_every_bad_sample(corrupt_set):
    urls, expected_bad = corrupt_set
    report = check_shards(urls)
    assert [(c.shard, c.good, c.bad) for c in report.shards] == [
        (urls[0], 2, 4),
        (urls[1], 2, len(CORRUPTIONS) - 4),
        (urls[2], 3, 1),  # samples 0-2 read before the cut in sample 3
    ]
    assert not report.ok
    assert {(b.shard, b.key) for b in report.bad} == set(expected_bad)
    for bad in report.bad:
        assert expected_bad[(bad.shard, bad.key)] in bad.reason


def test_single_pass_training_skips_each_bad_sample_once_with_a_warning(corrupt_set, caplog):
    urls, expected_bad = corrupt_set
    loader = make_train_loader(
        urls,
        TO_TENSOR,
        TOKENIZER,
        batch_size=3,
        samples_per_epoch=1,
        shuffle_buffer=0,
        resampled=False,
    )
    with caplog.at_level(logging.WARNING, logger="trainers.loaders"):
        batches = list(loader)
    keys = [(k, b) for b in batches for k in b["key"]]
    assert sorted(k for k, _ in keys) == sorted(
        ["00000000", "00000005", "00000010", "00000019", "00000000", "00000001", "00000002"]
    )
    assert sum(b["skipped"] for b in batches) == len(expected_bad) == len(CORRUPTIONS) + 1
    warned = "\n".join(r.getMessage() for r in caplog.records)
    for shard, key in expected_bad:
        assert f"{shard} {key}:" in warned


def test_batches_hold_the_written_values(tmp_path):
    rng = np.random.default_rng(0)
    vectors = {}
    samples = []
    for i in range(6):
        vector = rng.normal(size=5).astype(np.float32)
        vectors[f"{i:08d}"] = vector
        buffer = io.BytesIO()
        np.save(buffer, vector)
        samples.append(good(i, **{"teacher_image.npy": buffer.getvalue()}))
    url = make_shard(tmp_path / "v.tar", samples)
    loader = make_train_loader(
        url, TO_TENSOR, TOKENIZER, 4, 8, shuffle_buffer=10, extra_fields=["teacher_image.npy"]
    )
    assert len(loader) == 2
    for batch in loader:
        assert batch["image"].shape == (4, 3, 8, 8) and batch["image"].dtype == torch.float32
        assert batch["text"].dtype == torch.long
        for row, key in enumerate(batch["key"]):
            index = int(key)
            expected_pixel = torch.tensor(colour_of(index), dtype=torch.float32) / 255
            assert torch.allclose(batch["image"][row, :, 3, 3], expected_pixel)
            assert torch.equal(batch["text"][row], TOKENIZER([f"caption number {index}"])[0])
            assert torch.equal(batch["teacher_image"][row], torch.from_numpy(vectors[key]))


@pytest.fixture
def ten_shards(tmp_path) -> list[str]:
    return [
        make_shard(tmp_path / "r" / f"{s:05d}.tar", [good(s * 10 + i) for i in range(10)])
        for s in range(10)
    ]


def _keys(loader) -> list[str]:
    return [k for batch in loader for k in batch["key"]]


def test_resampled_epochs_have_a_fixed_length_and_seeds_differ_by_rank_and_epoch(ten_shards):
    def loader(rank: int, seed: int = 0):
        return make_train_loader(
            ten_shards, TO_TENSOR, TOKENIZER, batch_size=8, samples_per_epoch=100, seed=seed,
            shuffle_buffer=20, rank=rank, world_size=2,
        )  # fmt: skip

    rank0 = loader(0)
    assert len(rank0) == math.ceil(100 / (8 * 2)) == 7
    epoch0 = list(rank0)
    assert [len(b["key"]) for b in epoch0] == [8] * 7
    epoch1 = _keys(rank0)
    assert _keys(loader(0)) == [k for b in epoch0 for k in b["key"]]  # reproducible
    assert epoch1 != [k for b in epoch0 for k in b["key"]]  # a new epoch draws anew
    assert _keys(loader(1)) != [k for b in epoch0 for k in b["key"]]  # ranks differ
    assert _keys(loader(0, seed=1)) != [k for b in epoch0 for k in b["key"]]
    again = loader(0)
    again.set_epoch(1)
    assert _keys(again) == epoch1


def test_resampled_skip_count_is_exact_per_pass(tmp_path):
    # One shard, 10 samples, bad at positions 1 and 4: 8 good per pass. 16 samples without
    # shuffling read exactly two passes, each through both bad samples (they precede the 8th).
    samples = [good(i) for i in range(10)]
    samples[1] = corrupted(1, "empty caption")
    samples[4] = corrupted(4, "corrupt image")
    url = make_shard(tmp_path / "one.tar", samples)
    loader = make_train_loader(url, TO_TENSOR, TOKENIZER, 4, 16, shuffle_buffer=0)
    batches = list(loader)
    assert len(batches) == 4
    assert sum(b["skipped"] for b in batches) == 4
    assert _keys(batches) == 2 * [f"{i:08d}" for i in (0, 2, 3, 5, 6, 7, 8, 9)]


def test_no_good_sample_fails_at_once_with_the_pattern(tmp_path):
    bad = make_shard(
        tmp_path / "bad" / "00000.tar", [corrupted(i, "empty caption") for i in range(3)]
    )
    with pytest.raises(InputError, match=r"bad/00000.tar.*no good sample") as error:
        make_train_loader(bad, TO_TENSOR, TOKENIZER, 2, 10)
    assert "empty caption" in str(error.value)
    with pytest.raises(InputError, match="nope"):
        make_train_loader(str(tmp_path / "nope-{0..3}.tar"), TO_TENSOR, TOKENIZER, 2, 10)
    good_url = make_shard(tmp_path / "g.tar", [good(0)])
    with pytest.raises(InputError, match=r"teacher_image\.npy"):
        make_train_loader(good_url, TO_TENSOR, TOKENIZER, 2, 10, extra_fields=["teacher_image.npy"])


def test_pipe_and_file_urls_are_read(tmp_path):
    url = make_shard(tmp_path / "p.tar", [good(i) for i in range(3)])
    loader = make_train_loader(
        [f"pipe:cat {url}"], TO_TENSOR, TOKENIZER, 2, 1, shuffle_buffer=0, resampled=False
    )
    assert _keys(loader) == ["00000000", "00000001", "00000002"]
    assert [b.good for b in check_shards(f"file://{url}").shards] == [3]

    failing = f"pipe:cat {tmp_path}/missing.tar"
    report = check_shards([failing])
    assert [(b.shard, b.key) for b in report.bad] == [(failing, "-")]
    assert "unreadable shard" in report.bad[0].reason and "exit 1" in report.bad[0].reason
    loader = make_train_loader([url, failing], TO_TENSOR, TOKENIZER, 8, 1, resampled=False)
    assert [(len(b["key"]), b["skipped"]) for b in loader] == [(3, 1)]


def test_skip_counts_sum_exactly_across_workers(corrupt_set, tmp_path):
    urls, expected_bad = corrupt_set
    all_bad = make_shard(tmp_path / "allbad.tar", [corrupted(i, "bad utf-8") for i in range(3)])
    for shards, expected in ((urls, len(expected_bad)), ([urls[0], all_bad], 4 + 3)):
        loader = make_train_loader(
            shards, TO_TENSOR, TOKENIZER, 2, 1, num_workers=2, shuffle_buffer=0, resampled=False
        )
        batches = list(loader)
        assert all(b["key"] for b in batches)
        assert sum(b["skipped"] for b in batches) == expected


def test_workers_draw_different_samples(ten_shards):
    loader = make_train_loader(ten_shards, TO_TENSOR, TOKENIZER, 5, 20, num_workers=2)
    batches = list(loader)
    assert len(batches) == 4
    assert batches[0]["key"] != batches[1]["key"]  # worker 0's first batch vs worker 1's


def test_fewer_shards_than_workers_still_fills_the_epoch(tmp_path):
    url = make_shard(tmp_path / "only.tar", [good(i) for i in range(5)])
    loader = make_train_loader(url, TO_TENSOR, TOKENIZER, 4, 24, num_workers=2, shuffle_buffer=4)
    batches = list(loader)
    assert len(batches) == len(loader) == 6
    assert all(len(b["key"]) == 4 for b in batches)
    assert set(_keys(batches)) == {f"{i:08d}" for i in range(5)}


# --------------------------------------------------------------------------- eval sets


def test_eval_set_maps_captions_to_images(tmp_path):
    first = [
        good(0, json=json.dumps({"captions": [f"zero {i}" for i in range(5)]}).encode()),
        good(1, json=json.dumps({"captions": ["one a", "one b"]}).encode()),
        corrupted(2, "malformed json"),
    ]
    second = [good(3), good(4, json=b'{"caption": "no list: the txt counts"}')]
    urls = [make_shard(tmp_path / "e0.tar", first), make_shard(tmp_path / "e1.tar", second)]
    evalset = load_eval_set(urls, TO_TENSOR, TOKENIZER)
    assert evalset.keys == ["00000000", "00000001", "00000003", "00000004"]
    assert evalset.text_to_image.tolist() == [0, 0, 0, 0, 0, 1, 1, 2, 3]
    assert evalset.captions[5:] == ["one a", "one b", "caption number 3", "caption number 4"]
    assert torch.equal(evalset.tokens, TOKENIZER(evalset.captions))
    assert evalset.images.shape == (4, 3, 8, 8)
    assert torch.allclose(evalset.images[2, :, 0, 0], torch.tensor(colour_of(3)) / 255.0)
    assert evalset.skipped == 1


def test_first_images_keeps_those_images_and_only_their_captions(tmp_path):
    samples = [
        good(0, json=json.dumps({"captions": ["zero a", "zero b"]}).encode()),
        good(1),
        good(2, json=json.dumps({"captions": ["two a", "two b", "two c"]}).encode()),
    ]
    evalset = load_eval_set(make_shard(tmp_path / "e.tar", samples), TO_TENSOR, TOKENIZER)
    cut = first_images(evalset, 2)
    assert cut.keys == ["00000000", "00000001"]
    assert cut.captions == ["zero a", "zero b", "caption number 1"]
    assert cut.text_to_image.tolist() == [0, 0, 1]
    assert torch.equal(cut.tokens, TOKENIZER(cut.captions))
    assert torch.equal(cut.images, evalset.images[:2])
    assert first_images(evalset, 3) is evalset


def test_eval_set_with_open_clip_preprocess_matches_direct_preprocessing(tmp_path):
    preprocess = open_clip.image_transform(16, is_train=False)
    url = make_shard(tmp_path / "e.tar", [good(i) for i in range(3)])
    evalset = load_eval_set(url, preprocess, TOKENIZER)
    direct = torch.stack([preprocess(Image.new("RGB", (8, 8), colour_of(i))) for i in range(3)])
    assert torch.allclose(evalset.images, direct)


def test_eval_set_without_good_samples_is_an_input_error(tmp_path):
    url = make_shard(tmp_path / "e.tar", [corrupted(0, "no caption")])
    with pytest.raises(InputError, match=r"e\.tar"):
        load_eval_set(url, TO_TENSOR, TOKENIZER)


# --------------------------------------------------------------------------- writing


def test_write_shard_is_reproducible_and_atomic(tmp_path):
    samples = [good(i) for i in range(4)]
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    assert write_shard(a, samples) == 4
    write_shard(b, samples)
    assert a.read_bytes() == b.read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["a.tar", "b.tar"]
    with tarfile.open(a) as tar:
        names = tar.getnames()
        assert {m.mtime for m in tar.getmembers()} == {0}
    assert names[:2] == ["00000000.png", "00000000.txt"]
    assert len(names) == 8
