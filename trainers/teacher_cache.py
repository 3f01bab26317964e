"""Teacher embeddings computed once per (teacher, shards), stored as shards next to the inputs.

A cache directory holds one output tar per input shard -- every original field of each sample
(jpg, txt, json ...) plus ``teacher_image.npy`` and ``teacher_text.npy`` (float32, d,
L2-normalised) -- and ``manifest.json`` with the fingerprint of (teacher weights, shard list,
preprocessing). Trials read these shards instead of the originals and never run the teacher.
Cached embeddings belong to un-augmented images: train-time augmentation is off while the cache
is on (``DistillationRun`` switches to the eval preprocessing).

Building runs one Ray task per shard, streaming sample by sample (never the whole set in
memory); a rebuild happens only when the fingerprint changes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainers.errors import InputError
from trainers.shards import shard_identity

TEACHER_FIELDS = ("teacher_image", "teacher_text")
MANIFEST = "manifest.json"
FORMAT_VERSION = 1


@dataclass
class CacheManifest:
    fingerprint: str
    teacher: str
    source_shards: list[str]
    cache_shards: list[str]  # file names inside the cache dir, one per source shard
    samples: int
    skipped: int
    embed_dim: int
    format_version: int = FORMAT_VERSION


def teacher_fingerprint(
    teacher_model: torch.nn.Module,
    teacher_name: str,
    preprocess: Any,
    context_length: int,
    shards: Sequence[str],
) -> str:
    """sha256 over the teacher's weights, its name, the preprocessing and the shard list."""
    digest = hashlib.sha256()
    digest.update(f"v{FORMAT_VERSION}|{teacher_name}|ctx{context_length}|{preprocess!r}".encode())
    for name, tensor in sorted(teacher_model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    for shard in shards:
        digest.update(shard_identity(shard, located=True).encode())
    return digest.hexdigest()


def read_manifest(cache_dir: str | Path) -> CacheManifest | None:
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return CacheManifest(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as error:
        raise InputError(f"{path}: not a conaclip teacher-cache manifest ({error})") from None


def cache_shards(cache_dir: str | Path, train_shards: str | Sequence[str], teacher) -> list[str]:
    """Paths of a cache's shards after checking it was built for these shards and teacher.

    teacher: the LoadedModel of the run's teacher. InputError when the cache is missing or stale.
    """
    from trainers.shards import expand_urls

    manifest = read_manifest(cache_dir)
    if manifest is None:
        raise InputError(
            f"teacher_cache: {cache_dir} holds no {MANIFEST}; "
            "build it with `conaclip teacher cache`"
        )
    shards = expand_urls(train_shards)
    expected = teacher_fingerprint(
        teacher.model, teacher.name, teacher.preprocess_eval, teacher.model.context_length, shards
    )
    if manifest.fingerprint != expected:
        raise InputError(
            f"teacher_cache: {cache_dir} was built for another teacher, shard list or "
            "preprocessing; rebuild it with `conaclip teacher cache`"
        )
    return [str(Path(cache_dir) / name) for name in manifest.cache_shards]


def encode_shard(
    shard: str,
    out_path: str,
    teacher_name: str,
    teacher_checkpoint: str | None,
    batch_size: int = 128,
    torch_threads: int | None = None,
) -> dict[str, int]:
    """Encode every sample of one shard with the frozen teacher and write the cache shard.

    Returns {"samples": written, "skipped": unreadable samples}. Writes to a temporary name and
    renames at the end, so an interrupted build never leaves a half shard that looks complete.
    """
    import webdataset as wds

    from trainers.models import load_model
    from trainers.shards import BadSample, SampleError, iter_shard, parse_sample, tar_writer

    if torch_threads:
        torch.set_num_threads(torch_threads)
    loaded = load_model(teacher_name, teacher_checkpoint, device="cpu")
    model = loaded.model.eval()
    counts = {"samples": 0, "skipped": 0}
    pending: list[tuple[dict[str, Any], torch.Tensor, str]] = []
    partial = out_path + ".partial"

    def flush(writer: wds.TarWriter) -> None:
        if not pending:
            return
        images = torch.stack([image for _, image, _ in pending])
        tokens = loaded.tokenizer([caption for _, _, caption in pending])
        with torch.no_grad():
            image_emb = model.encode_image(images, normalize=True).float().numpy()
            text_emb = model.encode_text(tokens, normalize=True).float().numpy()
        for (record, _, _), image_vec, text_vec in zip(pending, image_emb, text_emb, strict=True):
            record["teacher_image.npy"] = _npy_bytes(image_vec)
            record["teacher_text.npy"] = _npy_bytes(text_vec)
            writer.write(record)
        counts["samples"] += len(pending)
        pending.clear()

    with open(partial, "wb") as stream, tar_writer(stream) as writer:
        for raw in iter_shard(shard):
            if isinstance(raw, BadSample):
                counts["skipped"] += 1
                continue
            try:
                sample = parse_sample(raw)
            except SampleError:
                counts["skipped"] += 1
                continue
            caption = sample.captions[0]
            record = _cache_record(raw, caption)
            pending.append((record, loaded.preprocess_eval(sample.image), caption))
            if len(pending) >= batch_size:
                flush(writer)
        flush(writer)
    os.replace(partial, out_path)
    return counts


def _cache_record(raw: dict[str, Any], caption: str) -> dict[str, Any]:
    """The original fields, with the caption the teacher encoded as the only caption.

    A json "captions" list would let the train loader draw another caption than the one whose
    teacher embedding sits beside it, so the list is dropped and .txt holds the encoded one.
    """
    record = {k: v for k, v in raw.items() if not k.startswith("__") and not k.endswith(".npy")}
    record["__key__"] = raw["__key__"]
    record["txt"] = caption.encode("utf-8")
    if "json" in record:
        try:
            meta = json.loads(record["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            meta = None
        if isinstance(meta, dict) and "captions" in meta:
            meta.pop("captions")
            record["json"] = json.dumps(meta).encode("utf-8")
    return record


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array.astype(np.float32))
    return buffer.getvalue()


def build_teacher_cache(
    teacher_name: str,
    teacher_checkpoint: str | None,
    train_shards: str | Sequence[str],
    cache_dir: str | Path,
    batch_size: int = 128,
    progress: Callable[[int, int], None] | None = None,
    force: bool = False,
) -> CacheManifest:
    """Build (or reuse) the cache for ``train_shards``: one Ray task per shard.

    Reused when the manifest's fingerprint matches, rebuilt otherwise. ``progress(done, total)``
    is called once with done 0 when a build starts (never for a reused cache), then as shards
    finish. Uses the running Ray cluster (``ray.init`` if none).
    """
    import ray

    from trainers.models import embed_dim_of, load_model
    from trainers.shards import expand_urls

    shards = expand_urls(train_shards)
    teacher = load_model(teacher_name, teacher_checkpoint, device="cpu")
    fingerprint = teacher_fingerprint(
        teacher.model, teacher.name, teacher.preprocess_eval, teacher.model.context_length, shards
    )
    cache_dir = Path(cache_dir)
    existing = read_manifest(cache_dir)
    if (
        not force
        and existing is not None
        and existing.fingerprint == fingerprint
        and all((cache_dir / name).is_file() for name in existing.cache_shards)
    ):
        return existing
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / MANIFEST).unlink(missing_ok=True)  # stale from here on until rebuilt
    names = [f"{index:05d}.tar" for index in range(len(shards))]
    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    task = ray.remote(num_cpus=1)(encode_shard)
    refs = {
        task.remote(
            shard, str(cache_dir / name), teacher_name, teacher_checkpoint, batch_size, 1
        ): name
        for shard, name in zip(shards, names, strict=True)
    }
    if progress:  # at 0 now: the first shard can take minutes with a large teacher
        progress(0, len(refs))
    samples = skipped = 0
    remaining = list(refs)
    while remaining:
        done, remaining = ray.wait(remaining, num_returns=1)
        counts = ray.get(done[0])
        samples += counts["samples"]
        skipped += counts["skipped"]
        if progress:
            progress(len(refs) - len(remaining), len(refs))
    manifest = CacheManifest(
        fingerprint=fingerprint,
        teacher=teacher_name,
        source_shards=list(shards),
        cache_shards=names,
        samples=samples,
        skipped=skipped,
        embed_dim=embed_dim_of(teacher.model),
    )
    partial = cache_dir / (MANIFEST + ".partial")
    partial.write_text(json.dumps(asdict(manifest), indent=2))
    os.replace(partial, cache_dir / MANIFEST)
    return manifest
