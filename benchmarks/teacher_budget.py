"""Built-in teacher candidates at one budget: architecture, steps, batch and learning rate.

Each candidate is an open_clip config (the shipped conaclip-teacher.json, or the same with the
former ViT image tower, with the fields the candidate changes), registered with open_clip from
a temporary directory and trained from scratch with the loop the product uses
(``trainers.teacher.teacher_config``: the CLIP loss, warm-up + cosine), on the built-in data,
2 threads, then evaluated on the built-in eval set (1k images x 5k captions). One JSON line
per candidate is appended to --out.

    python benchmarks/teacher_budget.py --candidate shipped --steps 600 --amp
    python benchmarks/teacher_budget.py --candidate vit --steps 520 --amp
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import trainers  # noqa: F401  (torchvision compat first)
from orchestrator.assets import ensure_builtin_data
from orchestrator.config import Workspace
from trainers.distill import train_loop_per_worker
from trainers.models import CONFIG_DIR
from trainers.teacher import TEACHER_LR, teacher_config

# The former built-in teacher's image tower (a ViT, width 192 x 4, patch 8), the base of the
# ViT candidates; the shipped one is a timm resnet10t (trainers/model_configs/).
VIT_VISION: dict[str, Any] = {
    "image_size": 64,
    "patch_size": 8,
    "width": 192,
    "layers": 4,
    "head_width": 64,
    "mlp_ratio": 4.0,
}
# name -> (base, changes to it: {"vision_cfg": {...}, "text_cfg": {...}, ...}); base "shipped"
# is conaclip-teacher.json as it is, "vit" the same with the ViT image tower above.
CANDIDATES: dict[str, tuple[str, dict[str, Any]]] = {
    "shipped": ("shipped", {}),
    "vit": ("vit", {}),
    "w192x3": (
        "vit",
        {
            "vision_cfg": {"width": 192, "layers": 3},
            "text_cfg": {"width": 192, "heads": 3, "layers": 3},
        },
    ),
    "w256x3": (
        "vit",
        {
            "vision_cfg": {"width": 256, "layers": 3},
            "text_cfg": {"width": 256, "heads": 4, "layers": 3},
        },
    ),
    "w128x4": (
        "vit",
        {
            "vision_cfg": {"width": 128, "layers": 4},
            "text_cfg": {"width": 128, "heads": 2, "layers": 4},
        },
    ),
    # FLIP-style: half the image patches dropped at random in training (none at eval)
    "pd50": ("vit", {"vision_cfg": {"patch_dropout": 0.5}}),
    # the image tower pools by averaging its patch tokens instead of reading a class token
    "avgpool": ("vit", {"vision_cfg": {"pool_type": "avg"}}),
    # the contrastive temperature starts at 1/30, 1/50 or 1/100 instead of CLIP's 1/14.3
    # (still learned; the loop clamps the logit scale at 100)
    "ls30": ("vit", {"init_logit_scale": 3.4012}),
    "ls50": ("vit", {"init_logit_scale": 3.912}),
    "ls100": ("vit", {"init_logit_scale": 4.6052}),
    # smaller pictures: 6 x 6 patches of 8 px instead of 8 x 8 (the 64 px shards are resized
    # by the teacher's own preprocessing)
    "img48": ("vit", {"vision_cfg": {"image_size": 48}}),
    # other timm convolutional image towers (random init, average-pooled, linear projection)
    "r14t": ("shipped", {"vision_cfg": {"timm_model_name": "resnet14t"}}),
    "r18": ("shipped", {"vision_cfg": {"timm_model_name": "resnet18"}}),
    "cnatto": ("shipped", {"vision_cfg": {"timm_model_name": "convnext_atto"}}),
    # open_clip's ModifiedResNet (CLIP's RN50 design) at width 32
    "resnet64": ("vit", {"vision_cfg": {"layers": [1, 1, 1, 1], "width": 32, "head_width": 64}}),
}


def candidate_config(name: str) -> dict[str, Any]:
    base, changes = CANDIDATES[name]
    config = json.loads((CONFIG_DIR / "conaclip-teacher.json").read_text())
    if base == "vit":
        config["vision_cfg"] = dict(VIT_VISION)
    for section, change in changes.items():
        config[section] = {**config[section], **change} if isinstance(change, dict) else change
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidate", choices=sorted(CANDIDATES), default="shipped")
    parser.add_argument(
        "--steps", type=int, default=None, help="default: the product's budget at --amp's precision"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=TEACHER_LR)
    parser.add_argument("--warmup", type=int, default=None, help="default: the product's")
    parser.add_argument(
        "--shuffle-buffer",
        type=int,
        default=None,
        help="samples shuffled before batching (default: the product's); 0 keeps each shard's "
        "order, so a minimal-edit scene shares a batch with the scene it edits",
    )
    parser.add_argument(
        "--grad-clip", type=float, default=None, help="default: the product's; 0 turns it off"
    )
    parser.add_argument("--seed", type=int, default=0, help="initialisation and data order")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (2 = the demo's)")
    parser.add_argument("--weight-decay", type=float, default=None, help="default: the product's")
    parser.add_argument(
        "--eval-every", type=int, default=None, help="also evaluate every N steps (the curve)"
    )
    parser.add_argument(
        "--amp", action=argparse.BooleanOptionalAction, default=None,
        help="bfloat16 autocast (default: the product's)",
    )  # fmt: skip
    parser.add_argument("--out", default="runs/bench/teacher_budget.jsonl")
    args = parser.parse_args()

    import open_clip

    shards = ensure_builtin_data(Workspace())
    name = f"teacher-candidate-{args.candidate}"
    with tempfile.TemporaryDirectory() as work:
        (Path(work) / f"{name}.json").write_text(json.dumps(candidate_config(args.candidate)))
        open_clip.add_model_config(work)
        overrides: dict[str, Any] = {
            "out_dir": str(Path(work) / "run"),
            "torch_threads": args.threads,
        }
        if args.shuffle_buffer is not None:
            overrides["shuffle_buffer"] = args.shuffle_buffer
        if args.eval_every is not None:
            overrides["eval_every"] = args.eval_every
        if args.warmup is not None:
            overrides["warmup_steps"] = args.warmup
        if args.grad_clip is not None:
            overrides["grad_clip"] = args.grad_clip or None
        if args.weight_decay is not None:
            overrides["weight_decay"] = args.weight_decay
        if args.amp is not None:
            overrides["amp"] = args.amp
        cfg = teacher_config(
            shards.train, shards.eval, name=name, steps=args.steps,
            batch_size=args.batch_size, lr=args.lr, seed=args.seed, **overrides,
        )  # fmt: skip
        reports: list[dict[str, Any]] = []
        started = time.time()
        train_loop_per_worker(cfg.model_dump(mode="json"), lambda m, d: reports.append(m))
        wall = time.time() - started
    last = reports[-1]
    row = {
        "candidate": args.candidate,
        "steps": cfg.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "warmup_steps": cfg.warmup_steps,
        "shuffle_buffer": cfg.shuffle_buffer,
        "grad_clip": cfg.grad_clip,
        "threads": args.threads,
        "seed": args.seed,
        "weight_decay": cfg.weight_decay,
        "amp": cfg.amp,
        "wall_s": round(wall, 1),
        "train_s": round(last["train_s"], 1),
        "samples_per_s": round(cfg.steps * args.batch_size / last["train_s"], 1),
        **{k: round(last[k], 2) for k in ("rsum", "t2i_R1", "i2t_R1")},
    }
    if len(reports) > 1:  # (step, seconds of training, rsum) at every eval
        row["curve"] = [[r["step"], round(r["train_s"], 1), round(r["rsum"], 1)] for r in reports]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with Path(args.out).open("a") as handle:
        handle.write(json.dumps(row) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
