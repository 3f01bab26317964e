"""One distillation run: ``train_loop_per_worker`` for a Ray Train ``TorchTrainer``.

The same function runs without Ray when given a ``report(metrics, checkpoint_dir)`` callable
(unit tests, benchmarks, the bare-loop baseline). It knows nothing of Tune or MLflow. Teacher
pre-training is this loop with the single pair ``inter_ss:infonce`` and no teacher.

Per step: a batch of N images and captions per worker -> student embeddings (native width for
student-student types, mapped to the teacher's width for teacher-student types) and teacher
embeddings (from the teacher-embedding cache, or a live no-grad forward) -> all-gathered to the
global batch (student side with gradient) -> sum over pairs of weight x interaction_loss.
Every ``eval_every`` steps: retrieval metrics on the eval shards (rank 0; ranked within folds of
``eval_fold_size`` images), a checkpoint (model, optimiser, scheduler, step, RNG, and the eval's
per-query ranks and ties as ``eval_ranks.npz``) and one report from every rank.

With ``ema_decay`` set, an exponential moving average of the student (torch's
``AveragedModel`` with its EMA averaging function, parameters and buffers) is updated after
every optimizer step; every eval scores the average, not the student, and the checkpoint keeps
it under ``ema_student`` (which ``trainers.export`` prefers) with its update count, so a
resumed run carries on the same average.

Fair cells: a pair with weight "auto" is off during warm-up; over the ``balance_window`` steps
from ``balance_step`` the loop measures the gradient norm (w.r.t. the student's parameters) of
each auto pair's loss and of the weighted sum of the fixed-weight pairs, and then fixes the auto
weight to ``balance_share x |g_fixed| / |g_pair|`` (norms averaged over those steps and over
DDP ranks). Every report carries ``weight_<pair>`` and ``temperature_<pair>``: what ran.

The loop's parts that are not the loop live next to it: the optimiser, schedule and fair-cell
arithmetic in ``trainers.optim``, the worker's place (Ray Train or bare) and the collectives in
``trainers.worker_context``.
"""

from __future__ import annotations

import math
import os
import pickle
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn

from trainers.errors import InputError
from trainers.eval_cache import load_eval_set_cached
from trainers.evaluate import check_fold_size, evaluate_retrieval
from trainers.export import EMA_STATE
from trainers.graph import learning_type_spec
from trainers.loaders import first_images, make_train_loader
from trainers.losses import interaction_loss
from trainers.models import LoadedModel, build_student, embed_dim_of, load_model
from trainers.optim import adamw, gradient_norm, gradient_share_weights, warmup_cosine
from trainers.run_config import LEARNABLE, DistillConfig, PairConfig, load_distill_config
from trainers.teacher_cache import TEACHER_FIELDS, cache_shards
from trainers.worker_context import (
    Report,
    WorkerContext,
    bare_context,
    gather_no_grad,
    gather_with_grad,
    process_started_unix,
    ray_context,
)

# Called every PROGRESS_EVERY steps of a bare run with (step, total steps, samples/s, loss).
Progress = Callable[[int, int, float, float], None]
PROGRESS_EVERY = 5
CHECKPOINT_FILE = "checkpoint.pt"
RANKS_FILE = "eval_ranks.npz"  # per-query ranks of the eval in this checkpoint
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's clamp on the learnable temperature


def train_loop_per_worker(
    config: dict[str, Any],
    report: Report | None = None,
    resume_from: str | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run one distillation on this worker. Returns the last reported metrics.

    config: a DistillConfig as a dict. report: None under Ray Train (ray.train.report is used);
    otherwise called as report(metrics, checkpoint_dir) at each eval. resume_from: a checkpoint
    directory for bare runs (default: the newest under ``out_dir/checkpoints``). progress:
    called every PROGRESS_EVERY steps on rank 0 with (step, steps, samples/s since the last
    call, loss) so long bare runs can show where they are.
    """
    cfg = load_distill_config(config)
    context = ray_context() if report is None else bare_context(cfg, report, resume_from)
    return DistillationRun(cfg, context, progress).run()


class DistillationRun:
    """State of one worker's run; ``run()`` reads top to bottom like a recipe."""

    def __init__(
        self, cfg: DistillConfig, context: WorkerContext, progress: Progress | None = None
    ) -> None:
        self._created = time.perf_counter()
        # Wall-clock (Unix seconds) of this worker process's start and of this run's start:
        # with the trial's own start time they split a trial's start-up into scheduling +
        # process start, imports, and setup.
        self.started_at = {
            "process_started_unix": process_started_unix(),
            "run_started_unix": time.time(),
        }
        self.cfg = cfg
        self.ctx = context
        self.progress = progress if context.rank == 0 else None
        # Seconds spent in each phase since this worker (re)started; reported with every
        # eval so benchmarks can split a trial's wall-clock without a profiler.
        self.phase_s = {"setup_s": 0.0, "train_s": 0.0, "eval_s": 0.0, "checkpoint_s": 0.0}
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.teacher: LoadedModel | None = None
        teacher_dim = None
        if cfg.needs_teacher:
            # The teacher is always built (it fixes the width the head maps to); its forward
            # pass only runs when no cache is given.
            self.teacher = load_model(cfg.teacher, cfg.teacher_checkpoint, device=context.device)
            self.teacher.model.eval().requires_grad_(False)
            teacher_dim = embed_dim_of(self.teacher.model)
        self.student, self.student_loaded = build_student(
            cfg.student, teacher_embed_dim=teacher_dim, device=context.device
        )
        self.model: nn.Module = self.student
        if context.world_size > 1:
            import ray.train.torch

            self.model = ray.train.torch.prepare_model(self.student, move_to_device=False)
        self.optimizer = adamw(self.student, cfg.lr, cfg.weight_decay)
        self.ema = None if cfg.ema_decay is None else student_ema(self.student, cfg.ema_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(cfg.warmup_steps, cfg.steps)
        )
        self.step = 0
        self.samples_seen = 0
        self.skipped = 0
        self.last_metrics: dict[str, Any] = {}
        self.last_ranks: dict[str, np.ndarray] | None = None
        self.weights = {p.pair: 0.0 if p.is_auto else float(p.weight) for p in cfg.pairs}
        self.weights_resolved = not any(p.is_auto for p in cfg.pairs)
        # Gradient norms summed over the measuring steps: "fixed" and one entry per auto pair.
        self.norm_sums: dict[str, float] = {}
        self.norm_count = 0
        if context.resume_dir:
            self._load_checkpoint(Path(context.resume_dir))
        self.use_cache = cfg.needs_teacher and cfg.teacher_cache is not None
        if cfg.needs_teacher and not self.use_cache:
            self._check_live_teacher_inputs()

    # ----------------------------------------------------------------------------- the recipe
    def run(self) -> dict[str, Any]:
        cfg, ctx = self.cfg, self.ctx
        eval_set = self._load_eval_set() if ctx.rank == 0 else None
        batches = self._batches()
        self.model.train()
        self.phase_s["setup_s"] = time.perf_counter() - self._created
        train_seconds, window_samples = 0.0, 0
        tick_seconds, tick_samples = 0.0, 0
        if self.step >= cfg.steps:
            # Resumed from the final checkpoint (the driver died after the last report, before
            # Tune recorded the trial as done): report the end again, re-evaluated, so the
            # trial ends with its result instead of none.
            names = {"loss", *(pair.metric_name for pair in cfg.pairs)}
            saved = {k: float(v) for k, v in self.last_metrics.items() if k in names}
            self._report(saved, float(self.last_metrics.get("samples_per_s", 0.0)), eval_set)
        while self.step < cfg.steps:
            started = time.perf_counter()
            batch = next(batches)
            losses = self._train_step(batch)
            elapsed = time.perf_counter() - started
            train_seconds += elapsed
            self.phase_s["train_s"] += elapsed
            window_samples += batch["image"].shape[0] * ctx.world_size
            self.step += 1
            tick_seconds += elapsed
            tick_samples += batch["image"].shape[0] * ctx.world_size
            if self.progress and (self.step % PROGRESS_EVERY == 0 or self.step == cfg.steps):
                self.progress(
                    self.step, cfg.steps, tick_samples / max(tick_seconds, 1e-9), losses["loss"]
                )
                tick_seconds, tick_samples = 0.0, 0
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                throughput = window_samples / max(train_seconds, 1e-9)
                self._report(losses, throughput, eval_set)
                train_seconds, window_samples = 0.0, 0
        return self.last_metrics

    # ------------------------------------------------------------------------------ one step
    def _train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        cfg, device = self.cfg, self.ctx.device
        images = batch["image"].to(device, non_blocking=True)
        tokens = batch["text"].to(device, non_blocking=True)
        self.skipped += int(batch.get("skipped", 0))
        # bfloat16 autocast on CPU too: matmuls run on AVX-512 BF16 where the CPU has it
        # (trainers.precision decides where it pays); weights and optimizer state stay float32.
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.amp else nullcontext()
        with autocast:
            student = self.model(images, tokens)
            teacher = self._teacher_embeddings(batch, images, tokens)
            native = {"SI": student["image"], "ST": student["text"]}
            mapped = {"SI": student["image_to_teacher"], "ST": student["text_to_teacher"]}
            if cfg.global_batch and self.ctx.world_size > 1:
                native = {k: gather_with_grad(v) for k, v in native.items()}
                mapped = {k: gather_with_grad(v) for k, v in mapped.items()}
                teacher = {k: gather_no_grad(v) for k, v in teacher.items()}
            total = torch.zeros((), device=device)
            losses: dict[str, float] = {}
            values: dict[str, Tensor] = {}
            for pair in cfg.pairs:
                students = (
                    mapped if learning_type_spec(pair.learning_type).involves_teacher else native
                )
                value = interaction_loss(
                    {**teacher, **students},
                    pair.learning_type,
                    pair.strategy,
                    self._temperature(pair),
                    orientation=cfg.sym_orientation,
                ).float()
                values[pair.pair] = value
                total = total + self.weights[pair.pair] * value
                losses[pair.metric_name] = value.item()
        if not torch.isfinite(total):
            raise FloatingPointError(f"loss is {total.item()} at step {self.step}: {losses}")
        if not self.weights_resolved and self.step >= cfg.balance_step:
            self._measure_gradient_shares(values)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(self.student.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():
            self.student.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        if self.ema is not None:
            self.ema.update_parameters(self.student)
        self.samples_seen += images.shape[0] * self.ctx.world_size
        losses["loss"] = total.item()
        return losses

    def _temperature(self, pair: PairConfig) -> float | Tensor:
        temperature = self.cfg.temperature_of(pair)
        if temperature == LEARNABLE:
            return 1.0 / self.student.logit_scale.exp()
        return 1.0 if temperature is None else float(temperature)  # None: the loss reads no t

    def _measure_gradient_shares(self, values: dict[str, Tensor]) -> None:
        """One step of the fair-cell rule: add this step's gradient norms of the fixed-weight
        sum and of every auto pair; after ``balance_steps`` steps, fix the auto weights."""
        cfg = self.cfg
        params = [p for p in self.student.parameters() if p.requires_grad]
        fixed = sum(self.weights[p.pair] * values[p.pair] for p in cfg.pairs if not p.is_auto)
        targets = {"fixed": fixed, **{p.pair: values[p.pair] for p in cfg.pairs if p.is_auto}}
        measured = torch.stack([gradient_norm(loss, params) for loss in targets.values()])
        measured = measured.to(self.ctx.device)
        if self.ctx.world_size > 1 and dist.is_initialized():
            dist.all_reduce(measured)
            measured /= self.ctx.world_size
        for name, norm in zip(targets, measured.tolist(), strict=True):
            self.norm_sums[name] = self.norm_sums.get(name, 0.0) + norm
        self.norm_count += 1
        if self.norm_count < cfg.balance_window:
            return
        self.weights.update(gradient_share_weights(self.norm_sums, cfg.balance_share))
        self.weights_resolved = True

    def _used_settings(self) -> dict[str, float]:
        """``weight_<pair>`` (0 for an auto pair before it is measured) and, for pairs that
        read one, ``temperature_<pair>`` (the learnable one at its current value)."""
        settings: dict[str, float] = {}
        for pair in self.cfg.pairs:
            settings[f"weight_{pair.slug}"] = self.weights[pair.pair]
            if self.cfg.temperature_of(pair) is not None:
                temperature = self._temperature(pair)
                if isinstance(temperature, Tensor):
                    temperature = temperature.detach().item()
                settings[f"temperature_{pair.slug}"] = float(temperature)
        return settings

    def _teacher_embeddings(
        self, batch: dict[str, Any], images: Tensor, tokens: Tensor
    ) -> dict[str, Tensor]:
        if not self.cfg.needs_teacher:
            return {}
        device = self.ctx.device
        if self.use_cache:
            image, text = (batch[name].to(device).float() for name in TEACHER_FIELDS)
        else:
            with torch.no_grad():
                image = self.teacher.model.encode_image(images, normalize=True)
                text = self.teacher.model.encode_text(tokens, normalize=True)
        return {"TI": image.detach(), "TT": text.detach()}

    # ----------------------------------------------------------------------- data and eval
    def _batches(self) -> Iterator[dict[str, Any]]:
        cfg = self.cfg
        shards = cfg.train_shards
        extra: tuple[str, ...] = ()
        if self.use_cache:
            shards = cache_shards(cfg.teacher_cache, cfg.train_shards, self.teacher)
            extra = tuple(f"{name}.npy" for name in TEACHER_FIELDS)
        # Cached teacher embeddings belong to un-augmented images, so augmentation is off then.
        preprocess = (
            self.student_loaded.preprocess_eval
            if self.use_cache
            else self.student_loaded.preprocess_train
        )
        remaining = cfg.steps - self.step
        # A resumed run draws fresh samples instead of replaying the ones it already saw.
        loader = make_train_loader(
            shards,
            preprocess=preprocess,
            tokenizer=self.student_loaded.tokenizer,
            batch_size=cfg.batch_size,
            samples_per_epoch=remaining * cfg.batch_size * self.ctx.world_size,
            seed=cfg.seed * 1_000_003 + self.step,
            num_workers=cfg.loader_workers,
            shuffle_buffer=cfg.shuffle_buffer,
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
            extra_fields=extra,
            resampled=cfg.resampled,
        )
        epoch = 0
        while True:  # the epoch is sized to the run; wrap around only if a loader falls short
            yielded = False
            loader.set_epoch(epoch)
            epoch += 1
            for batch in loader:
                yielded = True
                yield batch
            if not yielded:
                raise InputError(f"train_shards: no sample could be read from {shards!r}")

    def _load_eval_set(self):
        if not self.cfg.eval_shards:
            return None
        loaded = self.student_loaded
        eval_set = load_eval_set_cached(
            self.cfg.eval_shards, loaded.preprocess_eval, loaded.tokenizer, self.cfg.eval_cache
        )
        if self.cfg.eval_max_images is not None:
            eval_set = first_images(eval_set, self.cfg.eval_max_images)
        # Before the first step, not at the first eval: a set that does not split into folds
        # would otherwise fail the run after eval_every steps of training.
        check_fold_size(len(eval_set.images), self.cfg.eval_fold_size, "eval_fold_size")
        return eval_set

    def _evaluate(self, eval_set) -> dict[str, float]:
        if eval_set is None:
            return {}
        scored = self.student if self.ema is None else self.ema.module
        was_training = scored.training
        scored.eval()
        ranks: dict[str, Tensor] = {}
        try:
            metrics = evaluate_retrieval(
                lambda x: scored.clip.encode_image(x, normalize=True),
                lambda t: scored.clip.encode_text(t, normalize=True),
                eval_set.images,
                eval_set.tokens,
                eval_set.text_to_image,
                batch_size=self.cfg.eval_batch_size,
                device=self.ctx.device,
                ranks_out=ranks,
                fold_size=self.cfg.eval_fold_size,
            )
        finally:
            scored.train(was_training)
        self.last_ranks = {name: value.numpy() for name, value in ranks.items()}
        self.last_ranks["text_to_image"] = eval_set.text_to_image.long().cpu().numpy()
        return metrics

    def _check_live_teacher_inputs(self) -> None:
        teacher, student = self.teacher.model, self.student.clip
        t_size = getattr(teacher.visual, "image_size", None)
        s_size = getattr(student.visual, "image_size", None)
        t_ctx, s_ctx = teacher.context_length, student.context_length
        if t_size != s_size or t_ctx != s_ctx:
            raise InputError(
                f"teacher {self.cfg.teacher} (image {t_size}, context {t_ctx}) and student "
                f"{self.cfg.student} (image {s_size}, context {s_ctx}) need different inputs: "
                "use the teacher cache (teacher_cache), which encodes with the teacher's own "
                "preprocessing"
            )

    # ---------------------------------------------------------------- reports, checkpoints
    def _report(self, losses: dict[str, float], throughput: float, eval_set) -> None:
        skipped = self.skipped
        if self.ctx.world_size > 1 and dist.is_initialized():
            count = torch.tensor([skipped], dtype=torch.long, device=self.ctx.device)
            dist.all_reduce(count)
            skipped = int(count.item())
        metrics: dict[str, Any] = {
            "step": self.step,
            "samples_seen": self.samples_seen,
            **losses,
            "samples_per_s": throughput,
            "skipped_samples": skipped,
            "lr": self.scheduler.get_last_lr()[0],
            "logit_scale": self.student.logit_scale.exp().item(),
            **self._used_settings(),
        }
        if self.ctx.rank == 0:
            started = time.perf_counter()
            metrics.update(self._evaluate(eval_set))
            self.phase_s["eval_s"] += time.perf_counter() - started
        metrics.update(self.phase_s)
        metrics.update(self.started_at)
        self.last_metrics = metrics
        if self.ctx.rank != 0:
            self.ctx.report(metrics, None)
            return
        started = time.perf_counter()
        if self.ctx.checkpoint_root is not None:
            directory = self.ctx.checkpoint_root / f"step_{self.step:08d}"
            self._save_checkpoint(directory, metrics)
            self.ctx.report(metrics, str(directory))
        else:
            with tempfile.TemporaryDirectory(prefix="conaclip-ckpt-") as directory:
                self._save_checkpoint(Path(directory), metrics)
                self.ctx.report(metrics, directory)
        # Counted in the next report: this one is already on its way.
        self.phase_s["checkpoint_s"] += time.perf_counter() - started

    def _save_checkpoint(self, directory: Path, metrics: dict[str, Any]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        state = {
            "student": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "samples_seen": self.samples_seen,
            "skipped": self.skipped,
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
            "student_name": self.cfg.student,
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float)},
            "weights": dict(self.weights),
            "weights_resolved": self.weights_resolved,
            "norm_sums": dict(self.norm_sums),
            "norm_count": self.norm_count,
        }
        if self.ema is not None:
            state[EMA_STATE] = self.ema.module.state_dict()
            state["ema_updates"] = int(self.ema.n_averaged)
        # Write then rename: a crash mid-write never leaves a truncated checkpoint behind.
        partial = directory / (CHECKPOINT_FILE + ".partial")
        torch.save(state, partial)
        os.replace(partial, directory / CHECKPOINT_FILE)
        if self.last_ranks is not None and self.ctx.rank == 0:
            partial_ranks = directory / (RANKS_FILE + ".partial.npz")
            np.savez(partial_ranks, **self.last_ranks)
            os.replace(partial_ranks, directory / RANKS_FILE)

    def _load_checkpoint(self, directory: Path) -> None:
        path = directory / CHECKPOINT_FILE
        if not path.is_file():
            raise InputError(f"{path}: no {CHECKPOINT_FILE} in the checkpoint to resume from")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            reason = str(error).strip().splitlines()[0]
            raise InputError(f"{path}: refused, not a plain checkpoint ({reason})") from None
        self.student.load_state_dict(state["student"])
        if self.ema is not None and EMA_STATE in state:
            self.ema.module.load_state_dict(state[EMA_STATE])
            self.ema.n_averaged.fill_(int(state["ema_updates"]))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.samples_seen = int(state["samples_seen"])
        self.skipped = int(state["skipped"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(_as_random_state(state["python_rng"]))
        self.last_metrics = dict(state.get("metrics", {}))
        if "weights" in state:
            self.weights = {k: float(v) for k, v in state["weights"].items()}
            self.weights_resolved = bool(state["weights_resolved"])
            self.norm_sums = {k: float(v) for k, v in state["norm_sums"].items()}
            self.norm_count = int(state["norm_count"])


def student_ema(student: nn.Module, decay: float) -> AveragedModel:
    """torch's exponential moving average of ``student``'s parameters and buffers: a copy
    whose ``update_parameters(student)`` sets it to the student on the first call and to
    ``decay x average + (1 - decay) x student`` on every later one."""
    # The per-tensor EMA function, not get_ema_multi_avg_fn: the latter's foreach lerp turns
    # the -inf entries of open_clip's causal attention mask (a buffer) into NaN
    # (-inf + w x (-inf - -inf)), and the average's text tower would then return NaN.
    return AveragedModel(student, avg_fn=get_ema_avg_fn(decay), use_buffers=True)


def _as_random_state(value: Any) -> tuple:
    # torch.save turns the state's inner tuple into a list on some paths; random wants tuples.
    version, internal, gauss = value
    return (version, tuple(internal), gauss)
