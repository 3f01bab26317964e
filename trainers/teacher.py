"""Pre-train the built-in teacher with the plain CLIP loss on shards.

This is the distillation loop with the single pair ``inter_ss:infonce`` and no teacher (no fork
of the loop). The result is cached by a hash of its configuration and shards: a second
``make demo`` finds ``<cache_root>/<name>-<hash>/`` and skips training. Real users skip this
step and pass ``--teacher NAME --teacher-checkpoint FILE``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainers.distill import CHECKPOINT_FILE, Progress, train_loop_per_worker
from trainers.errors import InputError
from trainers.export import export_student, student_state
from trainers.models import build_student
from trainers.precision import bf16_autocast_pays
from trainers.run_config import DistillConfig

RESULT_FILE = "teacher.json"
# The built-in teacher's budget: what `make demo` trains on first use, in float32 and where
# bfloat16 autocast pays (more samples/s there, so more steps in the same time), with its peak
# learning rate, chosen over a sweep of learning rates on the built-in data with the resnet10t
# image tower (benchmarks/teacher_budget.py measures it). One default for every caller:
# ``teacher_steps``.
TEACHER_STEPS = 400
TEACHER_STEPS_BF16 = 600
TEACHER_LR = 1e-3
# The teacher's own recall is a report, not a verdict: one fold of the eval set tells a user
# whether it learned, without paying to score every image a student's eval needs.
TEACHER_EVAL_IMAGES = 1000


@dataclass
class TeacherResult:
    name: str  # open_clip model name of the architecture
    checkpoint: Path  # open_clip-loadable state dict
    metrics: dict[str, Any]  # the last eval report (recall of the teacher)
    reused: bool  # True when a cached result was found


def teacher_steps(amp: bool) -> int:
    """Steps of the built-in teacher's budget at this precision (same minutes either way)."""
    return TEACHER_STEPS_BF16 if amp else TEACHER_STEPS


def teacher_config(
    train_shards: str,
    eval_shards: str,
    name: str = "conaclip-teacher",
    steps: int | None = None,
    batch_size: int = 64,
    lr: float = TEACHER_LR,
    seed: int = 0,
    eval_every: int | None = None,
    warmup_steps: int | None = None,
    amp: bool | None = None,
    eval_max_images: int | None = TEACHER_EVAL_IMAGES,
    **overrides: Any,
) -> DistillConfig:
    """The DistillConfig that pre-trains ``name`` from scratch with the CLIP loss. ``amp``
    (bfloat16 autocast) defaults to wherever it pays on this machine (``trainers.precision``),
    ``steps`` to the built-in budget at that precision (``teacher_steps``), warm-up to a tenth
    of the steps and at most 100, its eval to the eval set's first ``TEACHER_EVAL_IMAGES``
    images (None: all of them)."""
    amp = bf16_autocast_pays() if amp is None else amp
    steps = teacher_steps(amp) if steps is None else steps
    return DistillConfig(
        pairs="inter_ss:infonce",
        student=name,
        teacher=None,
        train_shards=train_shards,
        eval_shards=eval_shards,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        eval_every=eval_every or steps,
        warmup_steps=min(100, steps // 10) if warmup_steps is None else warmup_steps,
        amp=amp,
        eval_max_images=eval_max_images,
        **overrides,
    )


def config_hash(cfg: DistillConfig) -> str:
    """Stable hash of everything that changes the trained weights (not where outputs go): the
    run's settings, the shards, and the open_clip config ``cfg.student`` names (its
    architecture and initial temperature), so an edited config never reuses old weights."""
    import open_clip

    from trainers.models import register_builtin_configs
    from trainers.shards import expand_urls, shard_identity

    # Settings of distillation pairs the CLIP loss never reads stay out, so adding one to
    # DistillConfig does not orphan every trained teacher.
    unused = {"kd_temperature", "sym_orientation"} | {
        "balance_share",
        "balance_after",
        "balance_steps",
    }
    # Eval folds and the images scored change the reported recall, not the weights; an EMA
    # changes the exported weights only when it is on, so a teacher trained without one keeps
    # its hash.
    unused |= {"eval_fold_size", "eval_max_images"}
    if cfg.ema_decay is None:
        unused.add("ema_decay")
    fields = cfg.model_dump(
        mode="json",
        exclude={"out_dir", "torch_threads", "loader_workers", "eval_cache", *unused},
    )
    shards = {"train_shards": cfg.train_shards, "eval_shards": cfg.eval_shards}
    for key, spec in shards.items():
        fields[key] = [shard_identity(p, dated=False) for p in expand_urls(spec)]
    register_builtin_configs()
    fields["model_config"] = open_clip.get_model_config(cfg.student)
    text = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def train_teacher(
    cfg: DistillConfig,
    cache_root: str | Path,
    on_report: Callable[[dict[str, Any]], None] | None = None,
    force: bool = False,
    on_progress: Progress | None = None,
) -> TeacherResult:
    """Train (or reuse) the teacher described by ``cfg``; returns where its weights are.

    Runs in this process without Ray (one CPU process is the fastest way to train a model this
    small here). Checkpoints go under the result directory, so an interrupted training resumes
    from its last eval on the next call. ``on_progress`` is called every few steps (see
    ``trainers.distill.Progress``) so a caller can show steps, samples/s and an ETA.
    """
    if cfg.needs_teacher or [p.pair for p in cfg.pairs] != ["inter_ss:infonce"]:
        raise InputError("teacher pre-training uses exactly the pair inter_ss:infonce")
    directory = Path(cache_root) / f"{cfg.student}-{config_hash(cfg)}"
    result_path = directory / RESULT_FILE
    if result_path.is_file() and not force:
        saved = json.loads(result_path.read_text())
        checkpoint = directory / saved["checkpoint"]
        if checkpoint.is_file():
            return TeacherResult(cfg.student, checkpoint, saved["metrics"], reused=True)
    directory.mkdir(parents=True, exist_ok=True)
    run_cfg = cfg.model_copy(update={"out_dir": str(directory)})

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        if on_report:
            on_report(metrics)

    metrics = train_loop_per_worker(
        run_cfg.model_dump(mode="json"), report=report, progress=on_progress
    )
    latest = sorted((directory / "checkpoints").glob("step_*"))[-1] / CHECKPOINT_FILE
    state = torch.load(latest, map_location="cpu", weights_only=True)
    student, _ = build_student(cfg.student, teacher_embed_dim=None)
    student.load_state_dict(student_state(state))
    weights = export_student(student, directory, cfg.student)
    final = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    result_path.write_text(
        json.dumps(
            {"checkpoint": weights.name, "metrics": final, "config": cfg.model_dump(mode="json")},
            indent=2,
        )
    )
    return TeacherResult(cfg.student, weights, final, reused=False)
