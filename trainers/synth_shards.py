"""Writes the shapes world (``trainers.shapes_world``) as the built-in data set: train and eval
splits as img2dataset-layout WebDataset shards, one process per shard, deterministic per
(seed, split, shard index), and a manifest that marks the set complete.

A share of scenes (``contrast``) are minimal edits of their predecessor (``perturb_scene``), so
neighbouring samples differ in binding, relation, size or position only.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trainers.errors import InputError
from trainers.shapes_world import (
    Scene,
    perturb_scene,
    render_caption,
    render_captions,
    render_image,
    sample_scene,
)
from trainers.shards import write_shard, write_shard_stats

GENERATOR_VERSION = 1
MANIFEST_NAME = "synth.json"
SAMPLES_PER_SHARD = 1000
DEFAULT_CONTRAST = 0.25
EVAL_CAPTIONS = 5


@dataclass(frozen=True)
class SynthResult:
    """What ``synthesize`` wrote. Shard lists are in key order."""

    out_dir: Path
    train_shards: tuple[Path, ...]
    eval_shards: tuple[Path, ...]
    train_samples: int
    eval_images: int
    eval_captions: int
    seconds: float = 0.0

    @property
    def train_urls(self) -> list[str]:
        return [str(p) for p in self.train_shards]

    @property
    def eval_urls(self) -> list[str]:
        return [str(p) for p in self.eval_shards]


@dataclass(frozen=True)
class _ShardTask:
    path: str
    split: str
    shard_index: int
    first_key: int
    count: int
    image_size: int
    seed: int
    captions_per_image: int  # 0: one caption, train style
    contrast: float
    params: dict[str, Any] = field(default_factory=dict)


_SPLIT_CODE = {"train": 0, "eval": 1}


def _write_one_shard(task: _ShardTask) -> int:
    rng = np.random.default_rng([task.seed, _SPLIT_CODE[task.split], task.shard_index])
    scene: Scene | None = None

    def samples():
        nonlocal scene
        for i in range(task.count):
            key = f"{task.first_key + i:08d}"
            if scene is not None and rng.random() < task.contrast:
                scene = perturb_scene(scene, rng)
            else:
                scene = sample_scene(rng)
            if task.captions_per_image:
                captions = render_captions(scene, rng, task.captions_per_image)
            else:
                captions = [render_caption(scene, rng)]
            buffer = io.BytesIO()
            quality = int(rng.integers(80, 96))
            render_image(scene, task.image_size, rng).save(buffer, "JPEG", quality=quality)
            meta: dict[str, Any] = {
                "key": key,
                "caption": captions[0],
                "width": task.image_size,
                "height": task.image_size,
                "status": "success",
                "scene": scene.to_json(),
            }
            if task.captions_per_image:
                meta["captions"] = captions
            yield {
                "__key__": key,
                "jpg": buffer.getvalue(),
                "txt": captions[0].encode(),
                "json": json.dumps(meta).encode(),
            }

    written = write_shard(Path(task.path), samples())
    write_shard_stats(Path(task.path), written, {"generator": task.params, "split": task.split})
    return written


def _validate(
    train_samples: int, eval_images: int, image_size: int, samples_per_shard: int, seed: int
) -> None:
    for name, value, lo, hi in (
        ("train_samples", train_samples, 1, 10**8),
        ("eval_images", eval_images, 1, 10**7),
        ("image_size", image_size, 32, 512),
        ("samples_per_shard", samples_per_shard, 1, 10**6),
        ("seed", seed, 0, 2**63 - 1),
    ):
        if not isinstance(value, int) or not lo <= value <= hi:
            raise InputError(f"synthesize: {name}={value!r}; expected an integer in [{lo}, {hi}]")


def _plan(out_dir: Path, split: str, total: int, per_shard: int) -> list[tuple[Path, int, int]]:
    shards = []
    for index, first in enumerate(range(0, total, per_shard)):
        shards.append((out_dir / split / f"{index:05d}.tar", first, min(per_shard, total - first)))
    return shards


def _claim_out_dir(out_dir: Path) -> None:
    """Refuse to mix with shards this generator did not write; forget our own old ones."""
    manifest = out_dir / MANIFEST_NAME
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {out_dir}: exists and is not a directory; expected a directory")
    if manifest.exists():
        try:
            previous = json.loads(manifest.read_text())
            old = previous.get("train_shards", []) + previous.get("eval_shards", [])
        except (OSError, ValueError, AttributeError) as error:
            raise InputError(f"{manifest}: unreadable manifest ({error}); remove it") from error
        for name in old:
            for path in (out_dir / name, out_dir / (name[: -len(".tar")] + "_stats.json")):
                path.unlink(missing_ok=True)
        return
    for split in ("train", "eval"):
        foreign = sorted((out_dir / split).glob("*.tar")) if (out_dir / split).is_dir() else []
        if foreign:
            raise InputError(
                f"--out {out_dir}: {foreign[0]} was not written by `conaclip data synth` "
                f"(no {MANIFEST_NAME}); expected an empty or new directory"
            )


def synthesize(
    out_dir: str | os.PathLike[str],
    train_samples: int = 20_000,
    eval_images: int = 1_000,
    image_size: int = 64,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
    samples_per_shard: int = SAMPLES_PER_SHARD,
    contrast: float = DEFAULT_CONTRAST,
) -> SynthResult:
    """Write the shapes-world data set: ``out_dir/train/NNNNN.tar`` (one caption per sample)
    and ``out_dir/eval/NNNNN.tar`` (``EVAL_CAPTIONS`` captions per image in ``{key}.json``),
    each with ``NNNNN_stats.json``, then ``out_dir/synth.json``, the manifest that marks the
    set complete. ``contrast``: share of scenes that are a minimal edit of the previous one.
    Same arguments (bar ``workers``/``progress``) give byte-identical shards.
    """
    _validate(train_samples, eval_images, image_size, samples_per_shard, seed)
    if not 0 <= contrast < 1:
        raise InputError(f"synthesize: contrast={contrast!r}; expected a share in [0, 1)")
    out = Path(out_dir)
    _claim_out_dir(out)
    params = _params(train_samples, eval_images, image_size, seed, samples_per_shard, contrast)
    train_plan = _plan(out, "train", train_samples, samples_per_shard)
    eval_plan = _plan(out, "eval", eval_images, samples_per_shard)
    manifest = {
        "params": params,
        "complete": False,
        "train_shards": [str(p.relative_to(out)) for p, _, _ in train_plan],
        "eval_shards": [str(p.relative_to(out)) for p, _, _ in eval_plan],
    }
    for split in ("train", "eval"):
        (out / split).mkdir(parents=True, exist_ok=True)
    _write_manifest(out, manifest)

    tasks = [
        _ShardTask(
            str(path), split, index, first, count, image_size, seed, captions, contrast, params
        )
        for split, plan, captions in (("train", train_plan, 0), ("eval", eval_plan, EVAL_CAPTIONS))
        for index, (path, first, count) in enumerate(plan)
    ]
    start = time.perf_counter()
    _run_tasks(tasks, workers, progress)
    seconds = time.perf_counter() - start
    manifest["complete"] = True
    _write_manifest(out, manifest)
    return SynthResult(
        out_dir=out,
        train_shards=tuple(p for p, _, _ in train_plan),
        eval_shards=tuple(p for p, _, _ in eval_plan),
        train_samples=train_samples,
        eval_images=eval_images,
        eval_captions=eval_images * EVAL_CAPTIONS,
        seconds=seconds,
    )


def _params(*values: Any) -> dict[str, Any]:
    names = ("train_samples", "eval_images", "image_size", "seed", "samples_per_shard", "contrast")
    return {
        "generator": "shapes-world",
        "version": GENERATOR_VERSION,
        **dict(zip(names, values, strict=True)),
    }


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    tmp = out / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(out / MANIFEST_NAME)


def _run_tasks(tasks: list[_ShardTask], workers: int | None, progress: bool) -> None:
    from tqdm import tqdm

    workers = min(workers or os.cpu_count() or 1, len(tasks))
    bar = tqdm(total=sum(t.count for t in tasks), unit="sample", disable=not progress, desc="synth")
    with bar:
        if workers <= 1:
            for task in tasks:
                bar.update(_write_one_shard(task))
            return
        # fork: workers inherit the imported modules instead of re-importing torch per process.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with multiprocessing.get_context(method).Pool(workers) as pool:
            for written in pool.imap_unordered(_write_one_shard, tasks):
                bar.update(written)
            # Let the workers exit on their own: the pool's default terminate() SIGTERMs them,
            # and a worker forked from a process with Ray imported prints a stack trace on it.
            pool.close()
            pool.join()
