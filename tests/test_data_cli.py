"""`conaclip data synth|check|from-karpathy`, driven through ``register`` on a fresh parser."""

from __future__ import annotations

import argparse
import io
import json
import tarfile
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image
from torchvision import transforms

from orchestrator.data_cli import register
from trainers.errors import InputError
from trainers.loaders import load_eval_set, make_train_loader
from trainers.shards import check_shards, write_shard

TOKENIZER = open_clip.get_tokenizer("ViT-B-32")
TO_TENSOR = transforms.ToTensor()


def run(*argv: str | Path) -> int:
    parser = argparse.ArgumentParser(prog="conaclip")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", *map(str, argv)])
    return args.handler(args)


def test_synth_writes_a_checkable_set(tmp_path, capsys):
    out = tmp_path / "shapes"
    code = run(
        "synth", "--out", out, "--train-samples", "30", "--eval-images", "4",
        "--image-size", "40", "--seed", "3", "--workers", "1", "--no-progress",
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "30 train samples" in printed and "4 eval images x 5 captions" in printed
    report = check_shards([out / "train", out / "eval"])
    assert report.ok and sum(c.good for c in report.shards) == 34
    with tarfile.open(out / "eval" / "00000.tar") as tar:
        image = Image.open(io.BytesIO(tar.extractfile("00000000.jpg").read()))
        meta = json.loads(tar.extractfile("00000000.json").read())
    assert image.size == (40, 40) and len(meta["captions"]) == 5


def test_synth_rejects_a_non_positive_count(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run("synth", "--out", tmp_path, "--train-samples", "0")
    assert exit_info.value.code == 2
    assert "--train-samples" in capsys.readouterr().err


def good_sample(index: int) -> dict:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (index, 0, 0)).save(buffer, "PNG")
    return {"__key__": f"{index:08d}", "png": buffer.getvalue(), "txt": b"a caption"}


def test_check_exit_codes_and_report(tmp_path, capsys):
    good = tmp_path / "good.tar"
    write_shard(good, [good_sample(i) for i in range(3)])
    assert run("check", good, "--no-progress") == 0
    out = capsys.readouterr().out
    assert f"{good}         3       0" in out and "total (1 shards)" in out

    bad = tmp_path / "bad.tar"
    samples = [good_sample(i) for i in range(4)]
    samples[1]["txt"] = b""
    samples[3]["json"] = b"{broken"
    write_shard(bad, samples)
    assert run("check", f"{tmp_path}/*.tar", "--no-progress") == 1
    out = capsys.readouterr().out
    assert "2 bad sample(s)" in out
    assert f"  {bad} 00000001: empty caption (.txt)" in out
    assert f"  {bad} 00000003: malformed .json" in out

    assert run("check", good, "--require", "teacher_image.npy", "--no-progress") == 1
    with pytest.raises(InputError, match="nothing-here"):
        run("check", tmp_path / "nothing-here" / "*.tar")


def _png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), colour).save(buffer, "PNG")
    return buffer.getvalue()


def repeats_set(root: Path) -> list[Path]:
    """Two shards whose good samples repeat captions and images (and one bad sample whose
    repeats do not count): see test_check_reports_repeated_captions_and_images."""
    red, green, blue, yellow = (_png(c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 0)))

    def captions(*texts: str) -> bytes:
        return json.dumps({"captions": list(texts)}).encode()

    first = [
        {"__key__": "k0", "png": red, "txt": b"a red square"},
        {"__key__": "k1", "png": green, "json": captions("a red square", " a green circle ")},
        {"__key__": "k2", "png": blue, "txt": b"  a red square  "},
        {"__key__": "k3", "png": red, "txt": b"a copy"},
        {"__key__": "k4", "png": red, "txt": b"another copy"},
        {"__key__": "k5", "png": yellow, "json": captions("twice", "twice")},  # one image: fine
        {"__key__": "k9", "png": blue, "txt": b""},  # bad: neither its image nor text counts
    ]
    second = [{"__key__": "k6", "png": green, "txt": b"a green circle"}]
    paths = [root / "00000.tar", root / "00001.tar"]
    write_shard(paths[0], first)
    write_shard(paths[1], second)
    return paths


def test_check_reports_repeated_captions_and_images(tmp_path, capsys):
    # Captions: "a red square" is k0's, k1's and (stripped) k2's; "a green circle" is k1's and
    # k6's: 2 texts on 5 captions, and k0, k1, k2, k6 have no caption of their own. k5's two
    # "twice" belong to one image, which is no tie. Images: k0's bytes again as k3 and k4, k1's
    # as k6: 2 contents on 5 samples.
    paths = repeats_set(tmp_path)
    report = check_shards(paths)
    assert [b.key for b in report.bad] == ["k9"]
    captions, images = report.repeated_captions, report.repeated_images
    assert (captions.texts, captions.captions, captions.images_all_shared) == (2, 5, 4)
    assert captions.examples == (
        ("a red square", 3, ("k0", "k1", "k2")),
        ("a green circle", 2, ("k1", "k6")),
    )
    assert (images.groups, images.images) == (2, 5)
    assert images.examples == ((3, ("k0", "k3", "k4")), (2, ("k1", "k6")))

    # Without the bad sample the check passes: repeats warn, they do not fail it.
    assert run("check", paths[1], "--no-progress") == 0
    good_only = tmp_path / "good"
    write_shard(good_only / "00000.tar", [s for s in _samples(paths[0]) if s["__key__"] != "k9"])
    assert run("check", good_only, paths[1], "--no-progress") == 0
    out = capsys.readouterr().out
    assert (
        "warning: 2 caption texts owned by more than one image (5 captions; 4 images with no "
        "caption of its own)" in out
    )
    assert "equally right for one query" in out and "expected value under a random order" in out
    assert "  'a red square': k0, k1, k2\n" in out and "  'a green circle': k1, k6\n" in out
    assert "warning: 2 images stored under more than one key (5 samples; identical bytes" in out
    assert "  k0, k3, k4\n" in out and "  k1, k6\n" in out


def _samples(path: Path) -> list[dict]:
    """The raw members of a shard, as write_shard takes them."""
    samples: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, _, ext = member.name.partition(".")
            samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
    return list(samples.values())


def test_check_of_a_set_without_repeats_warns_of_none(tmp_path, capsys):
    shard = tmp_path / "clean.tar"
    samples = [good_sample(i) for i in range(3)]
    for i, sample in enumerate(samples):
        sample["txt"] = f"caption {i}".encode()
    write_shard(shard, samples)
    assert run("check", shard, "--no-progress") == 0
    assert "warning" not in capsys.readouterr().out
    report = check_shards(shard)
    assert report.repeated_captions.texts == 0 and report.repeated_images.groups == 0


def test_more_repeats_than_examples_are_counted_and_cut_short(tmp_path, capsys):
    # Five images share one caption and pairs of them another: examples stop at 3 keys.
    shard = tmp_path / "many.tar"
    samples = [good_sample(i) for i in range(5)]
    for i, sample in enumerate(samples):
        sample["json"] = json.dumps({"captions": ["same", f"pair {i // 2}"]}).encode()
    write_shard(shard, samples)
    report = check_shards(shard)
    captions = report.repeated_captions
    # "same" on all 5; "pair 0" on 0-1, "pair 1" on 2-3 ("pair 2" on 4 alone).
    assert (captions.texts, captions.captions, captions.images_all_shared) == (3, 9, 4)
    assert captions.examples[0] == ("same", 5, ("00000000", "00000001", "00000002"))
    assert run("check", shard, "--no-progress") == 0
    assert "  'same': 00000000, 00000001, 00000002, +2 more" in capsys.readouterr().out


# --------------------------------------------------------------------------- Karpathy


def _write_image(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 5), colour).save(path)


def karpathy_set(root: Path) -> tuple[Path, Path, list[dict]]:
    """A Karpathy-format JSON in the Flickr30K (no filepath) and COCO (filepath) styles."""
    layout = [  # (filename, filepath, split, number of sentences)
        ("1000.jpg", "", "train", 5),
        ("1001.jpg", "", "train", 5),
        ("2000.png", "val2014", "restval", 6),
        ("3000.jpg", "", "val", 5),
        ("4000.jpg", "", "test", 6),
        ("4001.png", "val2014", "test", 5),
    ]
    images_dir = root / "images"
    records = []
    for index, (filename, filepath, split, count) in enumerate(layout):
        _write_image(images_dir / filepath / filename, (40 * index, 10, 200 - 30 * index))
        record = {
            "filename": filename,
            "split": split,
            "imgid": index,
            "sentences": [
                {"raw": f" image {index} sentence {j} ", "tokens": []} for j in range(count)
            ],
        }
        if filepath:
            record["filepath"] = filepath
        records.append(record)
    json_path = root / "dataset_test.json"
    json_path.write_text(json.dumps({"images": records, "dataset": "flickr30k"}))
    return json_path, images_dir, records


def test_from_karpathy_writes_train_and_five_caption_eval_shards(tmp_path, capsys):
    json_path, images_dir, records = karpathy_set(tmp_path)
    out = tmp_path / "shards"
    code = run(
        "from-karpathy", "--json", json_path, "--images", images_dir, "--out", out, "--no-progress"
    )
    assert code == 0
    assert "3 train images" in capsys.readouterr().out

    evalset = load_eval_set(out / "eval", TO_TENSOR, TOKENIZER)
    assert evalset.keys == ["00000000", "00000001"]
    assert evalset.text_to_image.tolist() == [0] * 5 + [1] * 5
    assert evalset.captions == [f"image {i} sentence {j}" for i in (4, 5) for j in range(5)]
    # the PNG stays lossless through the conversion: exact pixels of test image 5
    expected = torch.tensor([40 * 5, 10, 200 - 30 * 5], dtype=torch.float32) / 255
    assert torch.allclose(evalset.images[1, :, 2, 2], expected)

    with tarfile.open(out / "train" / "00000.tar") as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile("00000002.json").read())
    assert sorted(n for n in names if not n.endswith(("json", "txt"))) == [
        "00000000.jpg",
        "00000001.jpg",
        "00000002.png",
    ]
    assert meta["captions"] == [f"image 2 sentence {j}" for j in range(6)]  # train keeps all
    assert (meta["filename"], meta["filepath"], meta["split"]) == ("2000.png", "val2014", "restval")

    loader = make_train_loader(out / "train", TO_TENSOR, TOKENIZER, 3, 30, shuffle_buffer=0)
    allowed = {
        f"{k:08d}": {
            tuple(TOKENIZER([s["raw"].strip()])[0].tolist()) for s in records[r]["sentences"]
        }
        for k, r in enumerate((0, 1, 2))
    }
    drawn = set()
    for batch in loader:
        for key, tokens in zip(batch["key"], batch["text"], strict=True):
            assert tuple(tokens.tolist()) in allowed[key]
            drawn.add(tuple(tokens.tolist()))
    assert len(drawn) > 3  # several captions of the same image get drawn


def _record(**fields) -> dict:
    record = {"filename": "a.jpg", "split": "test", "sentences": [{"raw": "a caption"}]}
    record.update(fields)
    return {k: v for k, v in record.items() if v is not None}


@pytest.mark.parametrize(
    ("document", "field"),
    [
        ({"dataset": "x"}, "'images' missing"),
        ({"images": [_record(sentences=None)]}, "images[0].sentences missing"),
        ({"images": [_record(), _record(filename=None)]}, "images[1].filename missing"),
        (
            {"images": [_record(sentences=[{"raw": "ok"}, {}])]},
            "images[0].sentences[1].raw missing",
        ),
        ({"images": [_record(filename="a.gif")]}, "a.gif"),
        ({"images": [_record(split="train")]}, "'test'"),
    ],
)
def test_from_karpathy_names_file_and_field(tmp_path, document, field):
    json_path = tmp_path / "dataset_flickr30k.json"
    json_path.write_text(json.dumps(document))
    (tmp_path / "images").mkdir()
    out = tmp_path / "o"
    with pytest.raises(InputError) as error:
        run(
            "from-karpathy",
            "--json",
            json_path,
            "--images",
            tmp_path / "images",
            "--out",
            tmp_path / "o",
        )
    message = str(error.value)
    assert str(json_path) in message and field in message and "\n" not in message
    assert not out.exists()


def test_from_karpathy_checks_before_writing(tmp_path):
    json_path, images_dir, _ = karpathy_set(tmp_path)
    (images_dir / "1001.jpg").unlink()
    out = tmp_path / "o"
    with pytest.raises(InputError, match=r"1 of 5 image files missing, first: .*1001\.jpg"):
        run("from-karpathy", "--json", json_path, "--images", images_dir, "--out", out)
    assert not out.exists()

    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(InputError, match="not valid JSON"):
        run("from-karpathy", "--json", broken, "--images", images_dir, "--out", out)

    _write_image(images_dir / "1001.jpg", (1, 2, 3))
    (out / "eval").mkdir(parents=True)
    (out / "eval" / "00000.tar").write_bytes(b"precious")
    with pytest.raises(InputError, match="exists"):
        run("from-karpathy", "--json", json_path, "--images", images_dir, "--out", out)
    assert (out / "eval" / "00000.tar").read_bytes() == b"precious"
