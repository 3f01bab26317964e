"""A trained student out of a run: open_clip weights on disk, and what it costs to ship.

``export_student`` writes a student CLIP (width head dropped) as open_clip-loadable files;
``parameter_counts``, ``size_on_disk`` and ``encode_throughput`` measure a CLIP, and
``model_report`` puts them in one flat dict; ``export_checkpoint`` does all of it for one
trial's checkpoint, against its teacher, and ``industry_table`` renders the result. A run with
``ema_decay`` exports the moving average it evaluated (``student_state``).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from trainers.errors import InputError
from trainers.models import DistillStudent, build_student, clip_of, load_model

RECALL_PREFIXES = ("t2i_", "i2t_", "rsum")  # the logged metrics the report carries
# Checkpoint key of the student's exponential moving average (trainers.distill, ema_decay):
# the weights that run's evals scored, so the ones it ships.
EMA_STATE = "ema_student"


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as handle:
        temp = Path(handle.name)
    try:
        write(temp)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def export_student(
    student: nn.Module,
    out_dir: str | Path,
    name: str,
    model_cfg: Mapping[str, Any] | None = None,
) -> Path:
    """Write the student CLIP (width head dropped) as open_clip-loadable files.

    Writes ``{out_dir}/{name}.json`` (the open_clip model config) and ``{out_dir}/{name}.pt``
    (the CLIP state dict, CPU tensors, the model's dtype); returns the weights path. Load back
    with ``open_clip.add_model_config(out_dir)`` then
    ``open_clip.create_model(name, pretrained=str(path))``. ``model_cfg`` defaults to the one
    a DistillStudent recorded; a bare CLIP needs it passed.
    """
    if not name or Path(name).name != name or name.startswith("."):
        raise InputError(f"export name '{name}': expected a plain file stem such as 'my-student'")
    clip = clip_of(student)
    if model_cfg is None and isinstance(student, DistillStudent):
        model_cfg = student.model_cfg
    if model_cfg is None:
        raise ValueError("export_student needs model_cfg for a model without a recorded config")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights_path = out_dir / f"{name}.pt"
    state = {key: value.detach().cpu() for key, value in clip.state_dict().items()}
    _atomic_write(weights_path, lambda temp: torch.save(state, temp))
    config_text = json.dumps(dict(model_cfg), indent=4) + "\n"
    _atomic_write(out_dir / f"{name}.json", lambda temp: temp.write_text(config_text))
    return weights_path


def _token_embedding(clip: nn.Module) -> nn.Module | None:
    for owner in (clip, getattr(clip, "text", None)):
        embedding = getattr(owner, "token_embedding", None)
        if isinstance(embedding, nn.Embedding):
            return embedding
    text = getattr(clip, "text", None)
    transformer = getattr(text, "transformer", None)
    if hasattr(transformer, "get_input_embeddings"):  # HF text towers
        return transformer.get_input_embeddings()
    return None


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters per tower of an open_clip model (a DistillStudent counts its CLIP only).

    "image": the vision tower; "text": the text tower including its token embedding;
    "token_embedding": that embedding alone; "other": the logit scale (and bias);
    "total"; "total_excl_token_embedding".
    """
    clip = clip_of(model)
    image_ids = {id(p) for p in clip.visual.parameters()}
    logit_params = (getattr(clip, "logit_scale", None), getattr(clip, "logit_bias", None))
    other_ids = {id(p) for p in logit_params if p is not None}
    embedding = _token_embedding(clip)
    counts = {"image": 0, "text": 0, "other": 0}
    for parameter in clip.parameters():
        if id(parameter) in image_ids:
            counts["image"] += parameter.numel()
        elif id(parameter) in other_ids:
            counts["other"] += parameter.numel()
        else:
            counts["text"] += parameter.numel()
    counts["token_embedding"] = embedding.weight.numel() if embedding is not None else 0
    counts["total"] = counts["image"] + counts["text"] + counts["other"]
    counts["total_excl_token_embedding"] = counts["total"] - counts["token_embedding"]
    return counts


def size_on_disk(model: nn.Module) -> dict[str, int]:
    """Bytes of the CLIP state dict saved with torch.save in fp32 and in fp16 (measured)."""
    state = clip_of(model).state_dict()
    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
            path = Path(tmp) / f"{label}.pt"
            cast = {
                k: v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()
                for k, v in state.items()
            }
            torch.save(cast, path)
            sizes[label] = path.stat().st_size
    return sizes


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _per_second(run: Callable[[], Tensor], items: int, iters: int, device: torch.device) -> float:
    for _ in range(2):  # warm-up: allocator, kernel selection
        run()
    times = []
    for _ in range(iters):
        _synchronize(device)
        start = time.perf_counter()
        run()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    # The median batch, not the mean: on a shared machine other processes' bursts hit a few
    # batches hard and would otherwise decide the number.
    return items / statistics.median(times)


def random_inputs(
    model: nn.Module,
    batch_size: int,
    image_size: int | None = None,
    context_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images B x 3 x S x S float32, token ids B x L int64) drawn from a fixed seed, on CPU,
    for timing ``model`` (speed does not depend on values); S and L default to the model's."""
    clip = clip_of(model)
    image_size = image_size or clip.visual.image_size[0]
    context_length = context_length or getattr(clip, "context_length", None)
    context_length = context_length or clip.text.context_length
    vocab_size = getattr(clip, "vocab_size", None) or clip.text.vocab_size
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    tokens = torch.randint(0, vocab_size, (batch_size, context_length), generator=generator)
    return images, tokens


def encode_throughput(
    model: nn.Module,
    image_size: int | None = None,
    context_length: int | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    iters: int = 10,
) -> dict[str, float]:
    """Inference encode speed of images and of texts: items/s over the median batch wall time.

    Random inputs (speed does not depend on values); ``image_size``/``context_length`` default
    to the model's own. The model is moved to ``device`` and its train/eval mode is restored.
    """
    clip = clip_of(model)
    device = torch.device(device)
    images, tokens = random_inputs(clip, batch_size, image_size, context_length)
    images, tokens = images.to(device), tokens.to(device)
    was_training = clip.training
    clip.to(device).eval()
    try:
        with torch.inference_mode():
            images_per_s = _per_second(lambda: clip.encode_image(images), batch_size, iters, device)
            texts_per_s = _per_second(lambda: clip.encode_text(tokens), batch_size, iters, device)
    finally:
        clip.train(was_training)
    return {"images_per_s": images_per_s, "texts_per_s": texts_per_s}


def model_report(
    model: nn.Module,
    image_size: int | None = None,
    context_length: int | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    iters: int = 10,
) -> dict[str, Any]:
    """Parameters per tower, size on disk and encode throughput of a CLIP (heads excluded).

    Flat keys (MLflow-friendly): ``params_{image,text,token_embedding,other,total,
    total_excl_token_embedding}``, ``size_fp32_bytes``, ``size_fp16_bytes``, ``images_per_s``,
    ``texts_per_s``, plus the measurement settings ``device``, ``threads``, ``batch_size``.
    """
    report: dict[str, Any] = {f"params_{k}": v for k, v in parameter_counts(model).items()}
    report.update({f"size_{k}_bytes": v for k, v in size_on_disk(model).items()})
    report.update(encode_throughput(model, image_size, context_length, device, batch_size, iters))
    report.update(
        {"device": str(device), "threads": torch.get_num_threads(), "batch_size": batch_size}
    )
    return report


def student_state(checkpoint_state: Mapping[str, Any]) -> Mapping[str, Tensor]:
    """The student weights a trial checkpoint (the dict ``trainers.distill`` saves) stands for:
    the moving average under ``EMA_STATE`` when the run kept one (its evals scored it), else
    the trained student under "student"."""
    return checkpoint_state.get(EMA_STATE) or checkpoint_state["student"]


def load_student_checkpoint(checkpoint: str | Path, student: str) -> DistillStudent:
    """The student of a trial checkpoint (``student_state``: the EMA weights of an EMA run),
    built as ``student`` names it, in eval mode. The width head is rebuilt from the state's own
    shape (none when the checkpoint has none), so the state always loads strictly."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    weights = student_state(state)
    head = weights.get("teacher_head.weight")
    model, _ = build_student(
        student, teacher_embed_dim=None if head is None else int(head.shape[0])
    )
    model.load_state_dict(weights)
    model.eval()
    return model


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    name: str,
    student: str,
    metrics: Mapping[str, float],
    pairs: str | None = None,
    run_id: str | None = None,
    teacher: str | None = None,
    teacher_checkpoint: str | Path | None = None,
) -> dict[str, Any]:
    """Export the student of a trial ``checkpoint`` as ``out_dir/{name}.pt`` + ``.json``
    (``export_student``) and measure it, and the teacher when both ``teacher`` and
    ``teacher_checkpoint`` are given, with ``model_report`` on this machine.

    Returns the report (``run_id``, ``pairs``, ``weights``, ``config``, ``recall``: the
    ``metrics`` named t2i_*, i2t_*, rsum*; ``student`` and optionally ``teacher``: model
    reports) and writes it as ``{name}.report.json`` and ``{name}.report.md``
    (``industry_table``)."""
    out_dir = Path(out_dir)
    model = load_student_checkpoint(checkpoint, student)
    weights = export_student(model, out_dir, name)
    report: dict[str, Any] = {
        "run_id": run_id,
        "pairs": pairs,
        "weights": str(weights),
        "config": str(out_dir / f"{name}.json"),
        "recall": {k: metrics[k] for k in sorted(metrics) if k.startswith(RECALL_PREFIXES)},
        "student": model_report(model.clip),
    }
    if teacher and teacher_checkpoint:
        loaded = load_model(teacher, teacher_checkpoint)
        loaded.model.eval()
        report["teacher"] = model_report(loaded.model)
    (out_dir / f"{name}.report.json").write_text(json.dumps(report, indent=2, default=str))
    (out_dir / f"{name}.report.md").write_text(industry_table(report))
    return report


def industry_table(report: dict[str, Any]) -> str:
    """The paper's industry table: recall, parameters, size on disk, speed vs the teacher."""
    rows = [("student", report["student"])]
    if "teacher" in report:
        rows.insert(0, ("teacher", report["teacher"]))
    teacher = report.get("teacher")
    lines = [
        "| model | params (M) | excl. token emb. (M) | fp32 MB | fp16 MB | images/s | texts/s "
        "| speed-up (img / txt) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in rows:
        speed = "1.00x / 1.00x"
        if teacher and label == "student":
            speed = (f"{r['images_per_s'] / teacher['images_per_s']:.2f}x / "
                     f"{r['texts_per_s'] / teacher['texts_per_s']:.2f}x")  # fmt: skip
        lines.append(
            f"| {label} | {r['params_total'] / 1e6:.2f} | "
            f"{r['params_total_excl_token_embedding'] / 1e6:.2f} | "
            f"{r['size_fp32_bytes'] / 1e6:.1f} | {r['size_fp16_bytes'] / 1e6:.1f} | "
            f"{r['images_per_s']:.0f} | {r['texts_per_s']:.0f} | {speed} |"
        )
    recall = report["recall"]
    keys = [k for k in ("t2i_R1", "t2i_R5", "t2i_R10", "i2t_R1", "i2t_R5", "i2t_R10", "rsum")
            if k in recall]  # fmt: skip
    lines += ["", "| " + " | ".join(keys) + " |", "|" + "---:|" * len(keys),
              "| " + " | ".join(f"{recall[k]:.2f}" for k in keys) + " |"]  # fmt: skip
    return f"pairs: {report['pairs']}\n\n" + "\n".join(lines) + "\n"
