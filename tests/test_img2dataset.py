"""Shards written by the real img2dataset CLI, read by conaclip as they are.

Images are served by an HTTP server on 127.0.0.1 (two listed URLs are missing on purpose);
img2dataset downloads them into webdataset shards; `conaclip data check`, `conaclip teacher
train` and a short `conaclip train` (teacher cache included, the teacher of these shards and
not the built-in data's) then run on that folder with no conversion.

img2dataset lives in a venv of its own (`make img2dataset`, run by `make test`): it needs
pandas < 3 and webdataset 0.2.x, which the product venv does not allow. Its executable is
``$CONACLIP_IMG2DATASET`` (set by `make test`, which makes a missing one a failure), else
``.venv/img2dataset/bin/img2dataset``; outside make the test skips only when that is absent.
"""

from __future__ import annotations

import csv
import functools
import http.server
import json
import math
import os
import random
import re
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from trainers.shapes_world import COLOURS as WORLD_COLOURS

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_EXE = ROOT / ".venv" / "img2dataset" / "bin" / "img2dataset"
SERVED, MISSING = 38, 2
PER_SHARD = 16
# The built-in world's palette: photographs would do as well; these are small and deterministic.
RGB = {name: WORLD_COLOURS[name] for name in ("red", "green", "blue", "yellow", "white", "black")}
COLOURS = list(RGB)


def img2dataset_executable() -> Path:
    configured = os.environ.get("CONACLIP_IMG2DATASET")
    if configured:
        path = Path(configured)
        assert path.is_file(), f"CONACLIP_IMG2DATASET={configured}: no such file"
        return path
    if not DEFAULT_EXE.is_file():
        pytest.skip(f"img2dataset not installed at {DEFAULT_EXE}; `make img2dataset` installs it")
    return DEFAULT_EXE


def write_images(www: Path, count: int) -> list[tuple[str, str]]:
    """``count`` small images of varied size and format; (file name, caption) of each."""
    rng = random.Random(3)
    written = []
    for index in range(count):
        back, square = rng.sample(COLOURS, 2)
        width, height = rng.randint(40, 120), rng.randint(40, 120)
        image = Image.new("RGB", (width, height), RGB[back])
        side = min(width, height) // 2
        left, top = rng.randint(0, width - side), rng.randint(0, height - side)
        image.paste(RGB[square], (left, top, left + side, top + side))
        name = f"img{index:03d}.{'png' if index % 3 else 'jpg'}"
        image.save(www / name)
        written.append((name, f"a {square} square on a {back} background, picture {index}"))
    return written


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def _tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of a tar, grouped by key, read with tarfile alone."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Requests to 127.0.0.1 must not go to a proxy; albumentations (imported by img2dataset)
    # would otherwise ask PyPI for a newer version of itself.
    env.update(NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    env.update(NO_ALBUMENTATIONS_UPDATE="1", PYTHONUNBUFFERED="1")
    return env


@pytest.mark.integration
def test_img2dataset_shards_check_and_train_as_they_are(tmp_path):
    exe = img2dataset_executable()
    www = tmp_path / "www"
    www.mkdir()
    served = write_images(www, SERVED)
    handler = functools.partial(_QuietHandler, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    rows = [(f"{base}/{name}", caption) for name, caption in served]
    rows += [(f"{base}/gone{i}.jpg", f"an image that is not there {i}") for i in range(MISSING)]
    random.Random(5).shuffle(rows)  # missing ones fall anywhere, not only at the end
    url_list = tmp_path / "urls.csv"
    with url_list.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["url", "caption"])
        writer.writerows(rows)
    shards = tmp_path / "shards"
    try:
        downloaded = subprocess.run(
            [
                str(exe), "--url_list", str(url_list), "--input_format", "csv",
                "--url_col", "url", "--caption_col", "caption",
                "--output_format", "webdataset", "--output_folder", str(shards),
                "--image_size", "64", "--processes_count", "1", "--thread_count", "4",
                "--number_sample_per_shard", str(PER_SHARD), "--retries", "0", "--timeout", "10",
            ],
            env=_env(), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    if downloaded.returncode != 0:
        pytest.fail(f"img2dataset exited {downloaded.returncode}:\n{downloaded.stderr[-4000:]}")

    # --- what img2dataset wrote, read independently of conaclip
    tars = sorted(shards.glob("*.tar"))
    expected_shards = -(-len(rows) // PER_SHARD)
    assert len(tars) == expected_shards
    stats = [json.loads(t.with_name(t.stem + "_stats.json").read_text()) for t in tars]
    assert sum(s["successes"] for s in stats) == SERVED
    assert sum(s["failed_to_download"] for s in stats) == MISSING
    captions = dict(rows)
    samples: dict[str, dict[str, bytes]] = {}
    for tar in tars:
        samples.update(_tar_samples(tar))
    assert len(samples) == SERVED  # one sample per image served, none for the missing URLs
    for sample in samples.values():
        meta = json.loads(sample["json"])
        assert meta["status"] == "success"
        assert sample["txt"].decode() == captions[meta["url"]]
        assert (meta["width"], meta["height"]) == (64, 64)  # resized by img2dataset
    # img2dataset's per-shard parquet: one row per URL of the shard, with its status.
    table = pd.concat([pq.read_table(t.with_suffix(".parquet")).to_pandas() for t in tars])
    assert len(table) == len(rows)
    assert (table["status"] == "success").sum() == SERVED
    assert sorted(table.loc[table["status"] == "success", "key"]) == sorted(samples)

    # --- conaclip data check reads every one of them as good
    check = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "data", "check", "--no-progress", str(shards)],
        env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    total = re.search(r"^total \((\d+) shards\)\s+(\d+)\s+(\d+)$", check.stdout, re.MULTILINE)
    assert total is not None, check.stdout
    assert tuple(map(int, total.groups())) == (expected_shards, SERVED, 0)
    per_shard = {}
    for tar in tars:
        line = re.search(rf"^{re.escape(str(tar))}\s+(\d+)\s+(\d+)$", check.stdout, re.MULTILINE)
        assert line is not None, check.stdout
        per_shard[tar.name] = int(line.group(1))
    assert per_shard == {t.name: s["successes"] for t, s in zip(tars, stats, strict=True)}

    # --- the built-in teacher architecture trained on these shards, as a user would
    out, home = tmp_path / "train", tmp_path / "home"
    steps, batch = 4, 8
    teacher = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "teacher", "train", "--train-shards",
         str(shards), "--eval-shards", str(shards), "--steps", "2", "--batch-size", "8",
         "--home", str(home)],
        env=_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert teacher.returncode == 0, teacher.stdout[-2000:] + teacher.stderr[-4000:]
    own_teacher = json.loads(teacher.stdout)["checkpoint"]
    assert f"from scratch on {shards}" in teacher.stderr

    # --- a short conaclip train on the same folder, through the teacher cache: with no
    # teacher named, it distils from the teacher of these shards, never the built-in data's
    train = subprocess.run(
        [
            sys.executable, "-m", "orchestrator.cli", "train",
            "--train-shards", str(shards), "--eval-shards", str(shards),
            "--student", "conaclip-student-xs", "--pairs", "intra_ts:infonce",
            "--steps", str(steps), "--eval-every", "2", "--batch-size", str(batch),
            "--home", str(home), "--out", str(out),
        ],
        env=_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if train.returncode != 0:
        pytest.fail(
            f"train exited {train.returncode}:\n{train.stdout[-2000:]}\n{train.stderr[-4000:]}"
        )
    assert f"teacher: conaclip-teacher ({own_teacher}), trained on {shards}\n" in train.stdout
    assert not (home / "data").exists()  # the built-in data set was never generated
    history = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().split(
        "\n") if line]  # fmt: skip
    assert [h["step"] for h in history] == [2, 4]
    assert [h["samples_seen"] for h in history] == [2 * batch, 4 * batch]
    summary = json.loads((out / "train" / "metrics.json").read_text())
    assert summary["config"]["teacher_checkpoint"] == own_teacher
    final = summary["metrics"]
    assert final["step"] == steps
    # Eval ranked exactly the downloaded images (one caption each), and every recall is the
    # mean expected hit over them under a random order of tied items, recomputed here by hand
    # from the checkpoint's per-query counts.
    ranks_file = max(out.glob("train/checkpoint_*/eval_ranks.npz"))  # the last step's
    with np.load(ranks_file) as saved:
        ranks = {name: saved[name].tolist() for name in saved.files}
    assert ranks["text_to_image"] == list(range(SERVED))
    assert len(ranks["i2t_rank"]) == SERVED
    recalls = {k: v for k, v in final.items() if re.fullmatch(r"(t2i|i2t)_R\d+", k)}
    assert len(recalls) >= 4
    for name, value in recalls.items():
        k = int(name.split("_R")[1])
        if name.startswith("t2i"):
            hits = [
                min(max(k - above, 0), tied + 1) / (tied + 1)
                for above, tied in zip(ranks["t2i_rank"], ranks["t2i_ties"], strict=True)
            ]
        else:
            # No own caption in the first k - above places of a random order of the band.
            hits = [
                1
                - math.comb(tied, min(max(k - above, 0), tied + own))
                / math.comb(tied + own, min(max(k - above, 0), tied + own))
                for above, tied, own in zip(
                    ranks["i2t_rank"], ranks["i2t_ties"], ranks["i2t_own"], strict=True
                )
            ]
        assert value == pytest.approx(100 * sum(hits) / SERVED), name
    assert final["rsum"] == pytest.approx(sum(recalls.values()))
    # The teacher cache was built from img2dataset's shards, every sample kept.
    (manifest,) = home.glob("**/manifest.json")
    cache = json.loads(manifest.read_text())
    assert (cache["samples"], cache["skipped"]) == (SERVED, 0)
    assert cache["source_shards"] == [str(t) for t in tars]
