"""A real open_clip architecture (ViT-B-32, random weights saved to a local file) as the teacher
of an ablation trial: `conaclip ablate` in a subprocess, on a fresh local Ray cluster, with a
real SQLite MLflow store. The teacher sees 224 px images and 77-token captions while the
student (conaclip-student-xs, 64 px / 32 tokens) keeps its own preprocessing; only the teacher
cache makes that pairing possible, since the live path refuses mismatched inputs."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from orchestrator import tracking
from trainers.evaluate import QueryRanks, metrics_from_ranks
from trainers.models import load_model
from trainers.shards import expand_urls, iter_shard, write_shard
from trainers.teacher_cache import read_manifest, teacher_fingerprint

# Written out here rather than taken from open_clip's transform, so the check below says
# independently what "the teacher saw 224 px images" means (OpenAI CLIP's eval transform).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
TEACHER_224 = transforms.Compose(
    [
        transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize(OPENAI_MEAN, OPENAI_STD),
    ]
)
CHECKED_SAMPLES = 8
SUBSET = 64  # training samples the teacher encodes
EXPERIMENT = "vitb32-teacher"
STEPS = 6


def _tar_records(path: Path, limit: int) -> list[dict[str, bytes]]:
    """The first ``limit`` samples of a tar, grouped by key, read with tarfile alone."""
    records: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            if key not in records and len(records) == limit:
                break
            records.setdefault(key, {"__key__": key.encode()})[ext] = tar.extractfile(member).read()
    return list(records.values())


def _subprocess_env() -> dict[str, str]:
    # The subprocess must start its own local cluster, not join one a fixture left an address
    # for in this process's environment.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.mark.integration
def test_vit_b32_teacher_through_the_cache_into_the_xs_student(tiny_shapes, tmp_path):
    torch.manual_seed(0)
    teacher = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    # A plain state dict: the layout of open_clip's released open_clip_pytorch_model.bin files.
    checkpoint = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(teacher.state_dict(), checkpoint)

    # A shard of the first 64 built-in samples keeps the 224 px teacher pass short on two
    # cores; 6 steps x 16 read it one and a half times.
    source = expand_urls(str(tiny_shapes.out_dir / "train"))[0]
    subset = []
    for raw in iter_shard(source):
        subset.append({k: v for k, v in raw.items() if k != "__url__"})
        if len(subset) == SUBSET:
            break
    shard = str(tmp_path / "train" / "00000.tar")
    assert write_shard(Path(shard), subset) == SUBSET
    home, out = tmp_path / "home", tmp_path / "ablate"
    command = [
        sys.executable, "-m", "orchestrator.cli", "ablate",
        "--pairs", "intra_ts:infonce,inter_ts:kl",
        "--teacher", "ViT-B-32", "--teacher-checkpoint", str(checkpoint),
        "--student", "conaclip-student-xs",
        "--train-shards", shard, "--eval-shards", str(tiny_shapes.out_dir / "eval"),
        "--steps", str(STEPS), "--eval-every", "3", "--batch-size", "16",
        "--home", str(home), "--out", str(out), "--name", EXPERIMENT,
    ]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(
        command, env=_subprocess_env(), capture_output=True, text=True, timeout=900
    )
    elapsed = time.monotonic() - started
    if done.returncode != 0:
        pytest.fail(
            f"ablate exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        )
    print(f"ablate with the ViT-B-32 teacher: {elapsed:.0f} s")

    # --- the trial, as MLflow recorded it
    uri = f"sqlite:///{out}/mlruns.db"
    runs = tracking.runs_frame(uri, EXPERIMENT)
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["status"] == "FINISHED"
    assert run["tags.conaclip.status"] == "FINISHED"
    assert run["metrics.step"] == STEPS
    # The final recalls are exactly what the logged per-query ranks give.
    ranks = tracking.read_eval_ranks(uri, run["run_id"])
    assert ranks["i2t_rank"].shape == (60,)  # every eval image was ranked
    recalls = metrics_from_ranks(QueryRanks.from_arrays(ranks))
    for name, value in recalls.items():
        assert run[f"metrics.{name}"] == pytest.approx(value), name
    # The teacher-student KL pair ran with its full weight and gave a real loss.
    assert run["metrics.weight_inter_ts_kl"] == 1.0
    kl = run["metrics.loss_inter_ts_kl"]
    assert math.isfinite(kl) and kl > 0

    # --- the cache the trial read: ViT-B-32, over exactly the one shard
    manifests = sorted(home.glob("**/manifest.json"))
    assert len(manifests) == 1, manifests
    cache_dir = manifests[0].parent
    manifest = read_manifest(cache_dir)
    assert manifest.teacher == "ViT-B-32"
    assert manifest.embed_dim == 512  # ViT-B-32's joint width, not the student's 128
    assert manifest.source_shards == [shard]
    assert (manifest.samples, manifest.skipped) == (SUBSET, 0)
    assert run["params.teacher"] == "ViT-B-32"
    assert run["params.teacher_checkpoint"] == str(checkpoint)
    assert Path(run["params.teacher_cache"]) == cache_dir
    # Its fingerprint is the one of the ViT-B-32 weights in our file at 77 tokens.
    loaded = load_model("ViT-B-32", checkpoint)
    assert loaded.model.context_length == 77
    assert manifest.fingerprint == teacher_fingerprint(
        loaded.model, "ViT-B-32", loaded.preprocess_eval, 77, [shard]
    )

    # The cached embeddings are the teacher's on 224 x 224 images and 77-token captions,
    # recomputed here with our own transform from the bytes the cache shard holds.
    records = _tar_records(cache_dir / manifest.cache_shards[0], CHECKED_SAMPLES)
    assert len(records) == CHECKED_SAMPLES
    images = torch.stack(
        [TEACHER_224(Image.open(io.BytesIO(r["jpg"])).convert("RGB")) for r in records]
    )
    assert images.shape == (CHECKED_SAMPLES, 3, 224, 224)
    tokens = open_clip.get_tokenizer("ViT-B-32")([r["txt"].decode() for r in records])
    assert tokens.shape == (CHECKED_SAMPLES, 77)
    with torch.no_grad():
        image_emb = F.normalize(teacher.encode_image(images), dim=-1).numpy()
        text_emb = F.normalize(teacher.encode_text(tokens), dim=-1).numpy()
    cached_image = np.stack([np.load(io.BytesIO(r["teacher_image.npy"])) for r in records])
    cached_text = np.stack([np.load(io.BytesIO(r["teacher_text.npy"])) for r in records])
    assert cached_image.shape == cached_text.shape == (CHECKED_SAMPLES, 512)
    np.testing.assert_allclose(cached_image, image_emb, atol=2e-4)
    np.testing.assert_allclose(cached_text, text_emb, atol=2e-4)
    # Random ViT-B-32 weights still tell these images apart: the check above is not vacuous.
    assert np.abs(image_emb[0] - image_emb[1:]).max() > 1e-2
    # The premise of the pairing: the student's own inputs (64 px / 32 tokens) are not the
    # teacher's, so this run needed the cache (the live teacher path refuses the pair).
    config = json.loads(
        (Path(__file__).parents[1] / "trainers/model_configs/conaclip-student-xs.json").read_text()
    )
    assert (config["vision_cfg"]["image_size"], config["text_cfg"]["context_length"]) == (64, 32)
