"""Built-in assets on first use: the shapes-world shards, the teacher, the teacher cache.

Each is keyed by what produced it (generator settings; teacher config hash; cache fingerprint),
so repeated commands reuse them and a changed setting rebuilds only what it affects.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.config import Workspace
from trainers.run_config import DistillConfig

BUILTIN_TEACHER = "conaclip-teacher"
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
            _say(f"teacher: training {cfg.student} from scratch on {shards.train}, {total} "
                 f"steps x {cfg.batch_size}{', bfloat16 autocast' if cfg.amp else ''} "
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
        _say(f"teacher: reusing {result.checkpoint} (trained on {shards.train})")
    return result.name, str(result.checkpoint), result.metrics


def _shard_files(spec: str) -> list[str] | None:
    """The files a shard spec names, resolved and sorted; None when it names none (gone)."""
    from trainers.errors import InputError
    from trainers.shards import expand_urls

    try:
        return sorted(os.path.realpath(u) if "://" not in u else u for u in expand_urls(spec))
    except InputError:
        return None


def teachers_trained_on(workspace: Workspace, train_shards: str) -> list[Path]:
    """Checkpoints of built-in-architecture teachers in ``workspace`` trained on exactly the
    shard files ``train_shards`` names (``conaclip teacher train --train-shards``), oldest
    first."""
    from trainers.teacher import RESULT_FILE

    wanted = _shard_files(train_shards)
    found: list[tuple[float, Path]] = []
    for result in workspace.teacher_dir.glob(f"{BUILTIN_TEACHER}-*/{RESULT_FILE}"):
        try:
            saved = json.loads(result.read_text())
            checkpoint = result.parent / saved["checkpoint"]
            trained_on = saved["config"]["train_shards"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a teacher still training, or a file of an older layout
        if checkpoint.is_file() and _shard_files(trained_on) == wanted:
            found.append((result.stat().st_mtime, checkpoint))
    return [path for _, path in sorted(found)]


def own_data_teacher(workspace: Workspace, cfg: DistillConfig) -> str:
    """The built-in teacher architecture for a run on the user's own train shards: the one
    trained on those shards (``conaclip teacher train``), trained now on first use. Never the
    teacher of the built-in data: a student distilled on one data set from a teacher of another
    is not what the user asked for. ``InputError`` naming the checkpoints when several were
    trained on these shards (which one is the user's choice, ``--teacher-checkpoint``)."""
    from trainers.errors import InputError

    train = str(cfg.train_shards)
    found = teachers_trained_on(workspace, train)
    if len(found) > 1:
        raise InputError(
            f"--teacher {BUILTIN_TEACHER}: {len(found)} teachers in {workspace.teacher_dir} "
            f"were trained on {train}; name one with --teacher-checkpoint: "
            + ", ".join(str(path) for path in found)
        )
    if found:
        _say(f"teacher: {BUILTIN_TEACHER} trained on {train}: {found[0]}")
        return str(found[0])
    _say(f"teacher: no {BUILTIN_TEACHER} trained on {train} in {workspace.teacher_dir} yet")
    own = Shards(train=train, eval=str(cfg.eval_shards))
    return ensure_builtin_teacher(workspace, own)[1]


def teacher_provenance(cfg: DistillConfig) -> tuple[str, str]:
    """(``name (checkpoint)``, what it was trained on) for a resolved run's teacher: a
    conaclip-trained teacher's train shards from the record beside its weights, else what the
    checkpoint itself is."""
    from trainers.teacher import RESULT_FILE

    name = f"{cfg.teacher} ({cfg.teacher_checkpoint or 'random initial weights'})"
    if not cfg.teacher_checkpoint:
        return name, "nothing (no checkpoint: random initial weights)"
    record = Path(cfg.teacher_checkpoint).parent / RESULT_FILE
    try:
        return name, str(json.loads(record.read_text())["config"]["train_shards"])
    except (OSError, ValueError, KeyError, TypeError):
        return name, "not trained by conaclip (the checkpoint's own pre-training)"


def resolve_run(
    cfg: DistillConfig,
    workspace: Workspace,
    use_teacher_cache: bool,
    needs_teacher: bool | None = None,
) -> DistillConfig:
    """Fill the built-in data, teacher, teacher cache and eval-set cache into ``cfg`` where it
    names none; the teacher and its cache only when ``needs_teacher`` (default: whether
    ``cfg``'s own pairs read it; an ablation passes whether any of its pair sets does). The
    built-in teacher architecture without a checkpoint is the one trained on the run's train
    shards: the built-in data's, or the user's own (``own_data_teacher``)."""
    needs_teacher = cfg.needs_teacher if needs_teacher is None else needs_teacher
    updates: dict[str, Any] = {}
    own_train = bool(cfg.train_shards)
    if not cfg.train_shards or not cfg.eval_shards:
        shards = ensure_builtin_data(workspace)
        updates["train_shards"] = cfg.train_shards or shards.train
        updates["eval_shards"] = cfg.eval_shards or shards.eval
        cfg = cfg.model_copy(update=updates)
    if needs_teacher and cfg.teacher == BUILTIN_TEACHER and not cfg.teacher_checkpoint:
        if own_train:
            checkpoint = own_data_teacher(workspace, cfg)
        else:
            _, checkpoint, _ = ensure_builtin_teacher(workspace, ensure_builtin_data(workspace))
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
    process before the cluster exists, because an idle local cluster's daemons take CPU time
    from the teacher's training on a small machine; the teacher cache is built by Ray tasks,
    so after ``start_ray``."""
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
