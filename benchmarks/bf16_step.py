"""Training-step time of each built-in model in float32 and under bfloat16 autocast.

Backs the ``amp`` defaults (README "Teacher pre-training"): the built-in teacher trains under
bfloat16 autocast where ``trainers.precision`` says it pays, students only when asked
(``--amp``). One step is what the CLIP-loss loop does per batch: both encoders forward, the
symmetric InfoNCE over the batch, backward, fused AdamW. Inputs are random (step time does not
depend on their values). Each model is timed ``--repeats`` rounds, alternating float32 and
bfloat16 so both see the same machine state, and the best round of each is kept: on a shared
machine the least disturbed round is the closest to the model's own speed.

    .venv/bin/python benchmarks/bf16_step.py --threads 2 --batch-size 64

Prints a Markdown table and writes the rows (plus settings) as JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

import trainers  # noqa: F401  (torchvision compat before open_clip)
from trainers.export import random_inputs
from trainers.models import builtin_model_names, clip_of, load_model
from trainers.precision import cpu_has_bf16_dot_products


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None, help="default: every built-in")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per precision")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/bf16_step.json"))
    return parser.parse_args(argv)


def step_seconds(model: torch.nn.Module, batch_size: int, steps: int, bf16: bool) -> float:
    """Median wall seconds of one CLIP-loss training step (after 3 untimed ones)."""
    clip = clip_of(model).train()
    images, tokens = random_inputs(clip, batch_size)
    optimizer = torch.optim.AdamW(clip.parameters(), lr=1e-5, fused=True)
    labels = torch.arange(batch_size)

    def one() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
            image = F.normalize(clip.encode_image(images), dim=-1)
            text = F.normalize(clip.encode_text(tokens), dim=-1)
            logits = (clip.logit_scale.exp() * image @ text.T).float()
            loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        one()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        one()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    logging.disable(logging.WARNING)  # open_clip warns "initialized randomly" for every build
    torch.set_num_threads(args.threads)
    names = args.models or builtin_model_names()
    rows = []
    for name in names:
        model = load_model(name, device="cpu").model
        best = {False: float("inf"), True: float("inf")}
        for _ in range(args.repeats):
            for bf16 in (False, True):
                seconds = step_seconds(model, args.batch_size, args.steps, bf16)
                best[bf16] = min(best[bf16], seconds)
        rows.append(
            {
                "model": name,
                "fp32_ms": round(best[False] * 1000, 1),
                "bf16_ms": round(best[True] * 1000, 1),
                "speed_up": round(best[False] / best[True], 2),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    print(f"| model | float32 ms/step | bfloat16 ms/step | speed-up (batch {args.batch_size}) |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['fp32_ms']} | {r['bf16_ms']} | {r['speed_up']:.2f}x |")
    settings = {
        "batch_size": args.batch_size,
        "steps": args.steps,
        "repeats": args.repeats,
        "threads": args.threads,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "bf16_dot_products": cpu_has_bf16_dot_products(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
