"""`conaclip teacher train|cache` and `conaclip train` (one run on Ray Train, no Tune)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from orchestrator.assets import (
    Shards,
    ensure_builtin_data,
    ensure_builtin_teacher,
    resolve_run_around_ray,
    teacher_provenance,
)
from orchestrator.cli_flags import AMP_HELP, add_shared_flags, run_flags, workspace_of
from orchestrator.config import Workspace, build_settings, read_yaml
from orchestrator.ray_cluster import init_ray
from trainers.teacher import TEACHER_STEPS, TEACHER_STEPS_BF16


# ----------------------------------------------------------------------------- teacher train
def _teacher_train(args: argparse.Namespace) -> int:
    workspace = workspace_of(args)
    shards = _shards(args, workspace)
    overrides: dict[str, Any] = {}
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    if args.amp is not None:
        overrides["amp"] = args.amp
    name, checkpoint, metrics = ensure_builtin_teacher(
        workspace, shards, steps=args.steps, **overrides
    )
    print(json.dumps({"teacher": name, "checkpoint": checkpoint, "metrics": metrics}, indent=2))
    return 0


def _shards(args: argparse.Namespace, workspace: Workspace) -> Shards:
    if args.train_shards and args.eval_shards:
        return Shards(train=args.train_shards, eval=args.eval_shards)
    builtin = ensure_builtin_data(workspace)
    return Shards(train=args.train_shards or builtin.train, eval=args.eval_shards or builtin.eval)


# ----------------------------------------------------------------------------- teacher cache
def _teacher_cache(args: argparse.Namespace) -> int:
    workspace = workspace_of(args)
    settings = build_settings(
        {},
        {
            "teacher": args.teacher,
            "teacher_checkpoint": args.teacher_checkpoint,
            "train_shards": args.train_shards,
            "eval_shards": args.eval_shards,
        },
        source="command line",
    )
    cfg = resolve_run_around_ray(
        settings.run, workspace, True, lambda: init_ray(args.address), needs_teacher=True
    )
    print(cfg.teacher_cache)
    return 0


# ------------------------------------------------------------------------------------ train
def _train(args: argparse.Namespace) -> int:
    from orchestrator.trial import fit_or_raise, make_torch_trainer

    file_values = read_yaml(args.config) if args.config else {}
    flags = {
        **run_flags(args),
        "pairs": args.pairs,
        "seed": args.seed,
        "use_gpu": True if args.gpu else None,
    }
    settings = build_settings(file_values, flags, source=args.config or "command line")
    out = Path(args.out or "runs/train").resolve()
    out.mkdir(parents=True, exist_ok=True)
    workspace = workspace_of(args)
    cfg = resolve_run_around_ray(
        settings.run, workspace, settings.use_teacher_cache, lambda: init_ray(args.address)
    )
    run_name = args.name or "train"
    if cfg.needs_teacher:
        teacher, trained_on = teacher_provenance(cfg)
        print(f"teacher: {teacher}, trained on {trained_on}", flush=True)
    print(
        f"training {', '.join(p.pair for p in cfg.pairs)} on "
        f"{settings.scaling.num_workers} worker(s), {cfg.steps} steps -> {out}",
        flush=True,
    )
    trainer = make_torch_trainer(
        cfg, settings.scaling, run_name, out, history_file=out / run_name / "metrics.jsonl"
    )
    result = fit_or_raise(trainer, settings.scaling)
    summary = {
        "config": cfg.model_dump(mode="json"),
        "metrics": result.metrics,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
    }
    (out / run_name / "metrics.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"done: checkpoint {summary['checkpoint']}; metrics {out / run_name / 'metrics.json'}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    teacher = subparsers.add_parser(
        "teacher",
        help="pre-train the built-in teacher / build the teacher-embedding cache",
        description="Teacher steps: `train` pre-trains the built-in teacher with the CLIP loss "
        "(cached by config hash); `cache` runs the frozen teacher once over the train shards "
        "(one Ray task per shard) so trials never run it again.",
    )
    teacher_sub = teacher.add_subparsers(dest="teacher_command", metavar="STEP", required=True)
    train = teacher_sub.add_parser(
        "train",
        help="pre-train the built-in teacher",
        description="Pre-train conaclip-teacher on the train shards.",
    )
    add_shared_flags(train)
    train.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"default: the built-in budget, {TEACHER_STEPS_BF16} steps where bfloat16 autocast "
        f"pays (a CPU with AVX-512 BF16 or AMX, or a GPU), else {TEACHER_STEPS}",
    )
    train.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bfloat16 autocast (default: on where it pays); part of the teacher's cache key",
    )
    train.add_argument("--batch-size", type=int)
    train.set_defaults(handler=_teacher_train)
    cache = teacher_sub.add_parser(
        "cache",
        help="build the teacher-embedding cache",
        description="Encode the train shards once with the teacher.",
    )
    add_shared_flags(cache)
    cache.set_defaults(handler=_teacher_cache)

    run = subparsers.add_parser(
        "train",
        help="one distillation run on a local Ray cluster (no Tune)",
        description="Run one TorchTrainer: the student learns from the teacher with the given "
        "pairs. Prints a line per report; leaves checkpoints and metrics.json under --out.",
    )
    add_shared_flags(run)
    run.add_argument(
        "--pairs",
        help="comma list of learning_type:strategy[*weight][@temp], "
        "e.g. intra_ts:infonce,inter_ss:kl (default: intra_ts:infonce)",
    )
    run.add_argument("--workers", type=int, help="Ray Train workers (DDP ranks), default 1")
    run.add_argument("--gpu", action="store_true", help="one GPU per worker (nccl)")
    run.add_argument("--steps", type=int, help="optimiser steps (default 300)")
    run.add_argument("--eval-every", type=int, help="steps between eval + checkpoint")
    run.add_argument("--batch-size", type=int, help="per-worker batch size (default 64)")
    run.add_argument("--seed", type=int)
    run.add_argument("--amp", action=argparse.BooleanOptionalAction, help=AMP_HELP)
    run.add_argument("--name", help="run name under --out (default: train)")
    run.add_argument(
        "--no-teacher-cache",
        action="store_true",
        help="run the teacher live every step instead of reading the cache",
    )
    run.set_defaults(handler=_train)
