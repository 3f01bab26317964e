"""Size and encode throughput of the shipped models: the teacher against each student.

Backs the model-size / speed-up table (docs/method.md: the paper reports size and speed next to
recall). Weights are a random init: encode speed does not depend on their values. Each model is
timed --repeats times, round-robin over the models, and its best round is kept: on a shared
machine the least disturbed round is the closest to the model's own speed.

    .venv/bin/python benchmarks/model_throughput.py --threads 2 --out results/model_throughput.json

Prints a Markdown table and writes the rows (plus settings) as JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
from pathlib import Path

import torch

import trainers  # noqa: F401  (torchvision compat before open_clip)
from trainers.export import encode_throughput, model_report
from trainers.models import builtin_model_names, embed_dim_of, load_model

TEACHER = "conaclip-teacher"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None, help="default: every built-in")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--iters", type=int, default=20, help="timed batches per tower")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="rounds over all models")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("results/model_throughput.json"))
    return parser.parse_args(argv)


def _rows(names: list[str], args: argparse.Namespace) -> list[dict]:
    timing = {"device": args.device, "batch_size": args.batch_size, "iters": args.iters}
    models = {name: load_model(name, device=args.device).model for name in names}
    rows = {
        name: {"model": name, "embed_dim": embed_dim_of(model), **model_report(model, **timing)}
        for name, model in models.items()
    }
    for _ in range(args.repeats - 1):
        for name, model in models.items():
            for key, value in encode_throughput(model, **timing).items():
                rows[name][key] = max(rows[name][key], value)
    return list(rows.values())


def _table(rows: list[dict]) -> str:
    teacher = next((r for r in rows if r["model"] == TEACHER), rows[0])
    header = (
        "| model | embed | image params | text params (excl. tok. emb.) | token emb. | total "
        "| total excl. tok. emb. | fp32 MB | fp16 MB | images/s | texts/s | image speed-up "
        "| text speed-up |"
    )
    lines = [header, "|" + "|".join(["---"] * (header.count("|") - 1)) + "|"]
    for r in rows:
        text_excl = r["params_text"] - r["params_token_embedding"]
        lines.append(
            f"| {r['model']} | {r['embed_dim']} | {r['params_image'] / 1e6:.2f}M "
            f"| {text_excl / 1e6:.2f}M | {r['params_token_embedding'] / 1e6:.2f}M "
            f"| {r['params_total'] / 1e6:.2f}M "
            f"| {r['params_total_excl_token_embedding'] / 1e6:.2f}M "
            f"| {r['size_fp32_bytes'] / 2**20:.1f} | {r['size_fp16_bytes'] / 2**20:.1f} "
            f"| {r['images_per_s']:.0f} | {r['texts_per_s']:.0f} "
            f"| {r['images_per_s'] / teacher['images_per_s']:.2f}x "
            f"| {r['texts_per_s'] / teacher['texts_per_s']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    logging.disable(logging.WARNING)  # open_clip warns "initialized randomly" for every build
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.models or [TEACHER, *(n for n in builtin_model_names() if n != TEACHER)]
    rows = _rows(names, args)
    print(_table(rows))
    settings = {
        "batch_size": args.batch_size,
        "iters": args.iters,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "device": args.device,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
