"""Data throughput: the shapes-world generator (samples/s written) and the train pipeline
(decoded samples/s: tar read, JPEG decode, open_clip preprocess, tokenizer, batch of 64).

    .venv/bin/python benchmarks/data_throughput.py --out runs/bench/data_throughput.json

Prints a Markdown table and writes the same rows as JSON. Pipeline rows report steady state
(first batch excluded; it includes worker start-up and the shuffle-buffer fill, reported
separately as ``first_batch_s``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import trainers  # noqa: F401  (torchvision compat before open_clip)


def bench_generator(root: Path, train_samples: int, eval_images: int, workers: int) -> dict:
    from trainers.synth_shards import synthesize

    result = synthesize(
        root / f"gen-{workers}",
        train_samples=train_samples,
        eval_images=eval_images,
        workers=workers,
        progress=False,
    )
    samples = train_samples + eval_images
    return {
        "stage": "generator (synthesize)",
        "workers": workers,
        "samples": samples,
        "seconds": round(result.seconds, 3),
        "samples_per_s": round(samples / result.seconds, 1),
        "first_batch_s": None,
    }


def bench_pipeline(shards: list[str], image_size: int, batches: int, workers: int) -> dict:
    import open_clip

    from trainers.loaders import make_train_loader

    batch_size = 64
    loader = make_train_loader(
        shards,
        open_clip.image_transform(image_size, is_train=True),
        open_clip.get_tokenizer("ViT-B-32"),
        batch_size=batch_size,
        samples_per_epoch=batch_size * (batches + 1),
        num_workers=workers,
        shuffle_buffer=1000,
    )
    start = time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    first = time.perf_counter() - start
    steady_start = time.perf_counter()
    count = sum(len(batch["key"]) for batch in iterator)
    seconds = time.perf_counter() - steady_start
    return {
        "stage": "train pipeline (decode + preprocess + tokenize, batch 64)",
        "workers": workers,
        "samples": count,
        "seconds": round(seconds, 3),
        "samples_per_s": round(count / seconds, 1),
        "first_batch_s": round(first, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench/data_throughput.json"))
    parser.add_argument("--train-samples", type=int, default=4000)
    parser.add_argument("--eval-images", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=64, help="pipeline input size")
    parser.add_argument("--batches", type=int, default=60, help="steady-state batches timed")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="conaclip-bench-") as tmp:
        root = Path(tmp)
        for workers in (1, 2):
            rows.append(bench_generator(root, args.train_samples, args.eval_images, workers))
        shards = sorted(str(p) for p in (root / "gen-2" / "train").glob("*.tar"))
        for workers in (0, 2):
            rows.append(bench_pipeline(shards, args.image_size, args.batches, workers))

    print(f"cores: {os.cpu_count()}, {platform.processor() or platform.machine()}")
    print("| stage | workers | samples | seconds | samples/s | first batch s |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        first = "" if row["first_batch_s"] is None else f"{row['first_batch_s']:.2f}"
        print(
            f"| {row['stage']} | {row['workers']} | {row['samples']} | {row['seconds']:.2f} "
            f"| {row['samples_per_s']:.0f} | {first} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"cpu_count": os.cpu_count(), "image_size": args.image_size}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
