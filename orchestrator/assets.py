"""Built-in assets on first use: the shapes-world shards, the teacher, the teacher cache.

Each is keyed by what produced it (generator settings; teacher config hash; cache fingerprint),
so repeated commands reuse them and a changed setting rebuilds only what it affects.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.config import Workspace
from trainers.run_config import DistillConfig

BUILTIN_TRAIN_SAMPLES = 12_000
# Five folds of 1,000 (eval_fold_size): rsum keeps the 1k scale while the eval set's own noise
# in a gain shrinks (docs/results/noise_budget.json measures by how much, and at what cost).
BUILTIN_EVAL_IMAGES = 5_000


@dataclass
class Shards:
    train: str
    eval: str


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ensure_builtin_data(
    workspace: Workspace,
    train_samples: int = BUILTIN_TRAIN_SAMPLES,
    eval_images: int = BUILTIN_EVAL_IMAGES,
    seed: int = 0,
) -> Shards:
    """The built-in data set's shard patterns, generated under the workspace if missing."""
    from trainers.synth_shards import synthesize

    root = workspace.data_dir / f"shapes-n{train_samples}-e{eval_images}-s{seed}"
    done = root / "_complete"
    if not done.is_file():
        _say(f"generating the built-in data set in {root} (first use)")
        synthesize(root, train_samples=train_samples, eval_images=eval_images, seed=seed)
        done.write_text("ok\n")
    return Shards(train=str(root / "train"), eval=str(root / "eval"))


def ensure_builtin_teacher(
    workspace: Workspace, shards: Shards, steps: int | None = None, **overrides: Any
) -> tuple[str, str, dict[str, Any]]:
    """(teacher name, checkpoint path, its eval metrics), training it on first use (``steps``:
    the built-in budget at this machine's precision, ``trainers.teacher.teacher_steps``)."""
    from tqdm import tqdm

    from orchestrator.trial import format_progress
    from trainers.teacher import teacher_config, train_teacher

    cfg = teacher_config(shards.train, shards.eval, steps=steps, **overrides)
    bar: tqdm | None = None

    def on_progress(step: int, total: int, samples_per_s: float, loss: float) -> None:
        nonlocal bar
        if bar is None:
            _say(f"teacher: training {cfg.student} from scratch, {total} steps x "
                 f"{cfg.batch_size}{', bfloat16 autocast' if cfg.amp else ''} "
                 "(first use; cached afterwards)")  # fmt: skip
            bar = tqdm(total=total, desc="teacher", unit="step", file=sys.stderr)
        bar.set_postfix_str(f"loss {loss:.3f}, {samples_per_s:.0f} samples/s", refresh=False)
        bar.update(step - bar.n)

    def on_report(metrics: dict[str, Any]) -> None:
        if bar is not None and metrics.get("step", 0) >= cfg.steps:
            bar.close()
        _say("teacher: " + format_progress(metrics, cfg.steps))

    result = train_teacher(cfg, workspace.teacher_dir, on_report=on_report, on_progress=on_progress)
    if result.reused:
        _say(f"teacher: reusing {result.checkpoint}")
    return result.name, str(result.checkpoint), result.metrics


def resolve_run(
    cfg: DistillConfig,
    workspace: Workspace,
    use_teacher_cache: bool,
    needs_teacher: bool | None = None,
) -> DistillConfig:
    """Fill the built-in data, teacher, teacher cache and eval-set cache into ``cfg`` where it
    names none; the teacher and its cache only when ``needs_teacher`` (default: whether
    ``cfg``'s own pairs read it; an ablation passes whether any of its pair sets does)."""
    needs_teacher = cfg.needs_teacher if needs_teacher is None else needs_teacher
    updates: dict[str, Any] = {}
    if not cfg.train_shards or not cfg.eval_shards:
        shards = ensure_builtin_data(workspace)
        updates["train_shards"] = cfg.train_shards or shards.train
        updates["eval_shards"] = cfg.eval_shards or shards.eval
        cfg = cfg.model_copy(update=updates)
    if needs_teacher and cfg.teacher == "conaclip-teacher" and not cfg.teacher_checkpoint:
        shards = ensure_builtin_data(workspace)
        _, checkpoint, _ = ensure_builtin_teacher(workspace, shards)
        cfg = cfg.model_copy(update={"teacher_checkpoint": checkpoint})
    if needs_teacher and use_teacher_cache and not cfg.teacher_cache:
        cache = ensure_teacher_cache(cfg, workspace)
        cfg = cfg.model_copy(update={"teacher_cache": str(cache)})
    if cfg.eval_shards and cfg.eval_cache is None:
        cfg = cfg.model_copy(update={"eval_cache": str(workspace.eval_cache_dir)})
    return cfg


def resolve_run_around_ray(
    cfg: DistillConfig,
    workspace: Workspace,
    use_teacher_cache: bool,
    start_ray: Callable[[], object],
    needs_teacher: bool | None = None,
) -> DistillConfig:
    """``resolve_run`` with Ray started in between: the data and the teacher are made in this
    process before the cluster exists, because an idle local cluster's daemons slowed the
    built-in teacher's training from 185 to 172 samples/s on 2 cores; the teacher cache is
    built by Ray tasks, so after ``start_ray``."""
    cfg = resolve_run(cfg, workspace, False, needs_teacher)
    start_ray()
    return resolve_run(cfg, workspace, use_teacher_cache, needs_teacher)


def ensure_teacher_cache(cfg: DistillConfig, workspace: Workspace) -> Path:
    """Build (or reuse) the teacher-embedding cache for cfg's teacher and train shards."""
    from tqdm import tqdm

    from trainers.models import model_label
    from trainers.teacher_cache import build_teacher_cache

    checkpoint_tag = Path(cfg.teacher_checkpoint).parent.name if cfg.teacher_checkpoint else "init"
    shard_tag = Path(str(cfg.train_shards)).parent.name or "shards"
    teacher_tag = model_label(str(cfg.teacher))
    directory = workspace.cache_dir / f"{teacher_tag}-{checkpoint_tag}-{shard_tag}"
    bar: tqdm | None = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:  # only a build reports progress: a reused cache draws no empty bar
            bar = tqdm(total=total, desc="teacher cache", unit="shard", file=sys.stderr)
        bar.update(done - bar.n)

    manifest = build_teacher_cache(
        cfg.teacher, cfg.teacher_checkpoint, cfg.train_shards, directory, progress=progress
    )
    if bar is not None:
        bar.close()
    verb = "built" if bar is not None else "reusing"
    _say(f"teacher cache: {verb} {manifest.samples} samples in {directory}")
    return directory
