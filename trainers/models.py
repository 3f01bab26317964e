"""Teacher and student dual encoders built through open_clip, local checkpoints, export, report.

A model is named either by an open_clip architecture (its weights come from a local checkpoint;
nothing is ever downloaded) or by one of the JSON configs in ``trainers/model_configs/``, which
are registered with open_clip's own ``add_model_config`` so ``open_clip.create_model`` builds
them like any built-in. Checkpoints are read with ``torch.load(weights_only=True)`` only: a file
whose unpickling would run code is refused.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.convert import convert_state_dict
from open_clip.model import (
    convert_to_custom_text_state_dict,
    resize_pos_embed,
    resize_text_pos_embed,
)
from torch import Tensor, nn

from trainers.errors import InputError

CONFIG_DIR: Path = Path(__file__).resolve().parent / "model_configs"

# Wrappers that prefix every key: DDP ("module.") and torch.compile ("_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_SCHEMA_PREFIXES = ("hf-hub:", "local-dir:")


def _builtin_configs() -> dict[str, dict[str, Any]]:
    return {path.stem: json.loads(path.read_text()) for path in sorted(CONFIG_DIR.glob("*.json"))}


def builtin_model_names() -> list[str]:
    """Names of the configs shipped in CONFIG_DIR, sorted."""
    return sorted(path.stem for path in CONFIG_DIR.glob("*.json"))


def register_builtin_configs() -> None:
    """Register CONFIG_DIR with open_clip (``add_model_config``). Idempotent.

    Registers again only when open_clip does not already resolve every shipped name to the
    shipped config, so repeated calls do not grow open_clip's search path.
    """
    configs = _builtin_configs()
    if all(open_clip.get_model_config(name) == cfg for name, cfg in configs.items()):
        return
    open_clip.add_model_config(CONFIG_DIR)


@dataclass
class LoadedModel:
    """An open_clip model with what is needed to feed it.

    ``model`` is in train mode as open_clip leaves it; ``model_cfg`` is the open_clip config
    it was built from (what ``export_student`` writes); ``checkpoint`` the file its weights came
    from, None for a fresh random init.
    """

    model: nn.Module
    preprocess_train: Callable[[Any], Tensor]
    preprocess_eval: Callable[[Any], Tensor]
    tokenizer: Callable[..., Tensor]
    name: str
    model_cfg: dict[str, Any] = field(default_factory=dict)
    checkpoint: Path | None = None


def _resolve_name(name: str) -> str:
    """The open_clip registry name for ``name``; InputError when it names nothing local."""
    if name.startswith(_SCHEMA_PREFIXES):
        raise InputError(
            f"model '{name}': schema names are not supported (nothing is downloaded); pass an "
            "open_clip architecture name plus a local checkpoint file"
        )
    register_builtin_configs()
    resolved = name.replace("/", "-")  # open_clip's own spelling rule: ViT-B/32 -> ViT-B-32
    known = open_clip.list_models()
    if resolved not in known:
        close = difflib.get_close_matches(resolved, known, n=5, cutoff=0.6)
        hint = f"close matches: {', '.join(close)}" if close else "no close match"
        raise InputError(
            f"unknown model '{name}': {hint}; built-in: {', '.join(builtin_model_names())} "
            "(open_clip.list_models() lists every architecture)"
        )
    return resolved


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a checkpoint file into a plain state dict, with ``torch.load(weights_only=True)``.

    Accepts a state dict, or a dict holding one under "state_dict" or "model" (our trainers'
    checkpoints); strips DDP "module." and torch.compile "_orig_mod." key prefixes. Tensors land
    on the CPU. InputError for a missing file, a file torch refuses to load without running
    code, or content that is not a state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint file {path} not found (expected a local .pt state dict)")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(
            f"checkpoint {path}: not loadable with torch.load(weights_only=True): {reason}"
        ) from error
    state = loaded
    if isinstance(loaded, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(loaded.get(key), Mapping):
                state = loaded[key]
                break
    if not (
        isinstance(state, Mapping)
        and state
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items())
    ):
        raise InputError(
            f"checkpoint {path}: expected a state dict (str -> tensor), or a dict holding one "
            "under 'state_dict' or 'model'"
        )
    stripped = {}
    for key, value in state.items():
        for prefix in _WRAPPER_PREFIXES:
            key = key.removeprefix(prefix)
        stripped[key] = value
    return stripped


def load_weights(model: nn.Module, state_dict: Mapping[str, Tensor], source: str) -> None:
    """Load ``state_dict`` into an open_clip model, strictly.

    Applies open_clip's own layout fixes (third-party layouts, old text-tower layout, resized
    position embeddings) as ``open_clip.load_checkpoint`` does; that function takes a path, only
    unwraps "state_dict" and strips "module" by the first key alone, so it is not called
    directly. InputError naming ``source`` when keys or shapes do not fit.
    """
    state = convert_state_dict(model, dict(state_dict))
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    logit_scale = getattr(model, "logit_scale", None)
    if (
        isinstance(logit_scale, Tensor)
        and "logit_scale" in state
        and state["logit_scale"].numel() == logit_scale.numel()
    ):
        state["logit_scale"] = state["logit_scale"].reshape(logit_scale.shape)
    try:
        resize_pos_embed(state, model)
        resize_text_pos_embed(state, model)
    except (AssertionError, RuntimeError, ValueError):
        pass  # not resizable (the widths differ): the shape check below names the keys

    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        k for k in set(expected) & set(state) if expected[k].shape != state[k].shape
    )
    if missing or unexpected or wrong_shape:
        parts = [
            f"{label} {len(keys)} (e.g. {', '.join(keys[:3])})"
            for label, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("wrong shape", wrong_shape),
            )
            if keys
        ]
        raise InputError(f"checkpoint {source} does not fit this model: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)


class _DropRandomInitWarning(logging.Filter):
    """open_clip warns "No pretrained weights loaded ... initialized randomly" for every model
    built without its own `pretrained=` download. Weights here are always loaded afterwards
    from a local file (or random init is the point), so the warning would only mislead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded for model" not in record.getMessage()


@contextlib.contextmanager
def _quiet_random_init() -> Iterator[None]:
    root, dropper = logging.getLogger(), _DropRandomInitWarning()
    root.addFilter(dropper)
    try:
        yield
    finally:
        root.removeFilter(dropper)


def _create(name: str, device: str | torch.device) -> LoadedModel:
    """A randomly initialised open_clip model for a resolved name, with transforms and tokenizer."""
    model_cfg = open_clip.get_model_config(name)
    # pretrained_text/image=False: open_clip would otherwise fetch HF/timm tower weights.
    with _quiet_random_init():
        model, preprocess_train, preprocess_eval = open_clip.create_model_and_transforms(
            name, pretrained=None, device=device, pretrained_image=False, pretrained_text=False
        )
    try:
        tokenizer = open_clip.get_tokenizer(name)
    except OSError as error:
        raise InputError(
            f"model '{name}': its tokenizer is not available locally and nothing is downloaded"
        ) from error
    return LoadedModel(model, preprocess_train, preprocess_eval, tokenizer, name, model_cfg)


def load_model(
    name: str, checkpoint: str | Path | None = None, device: str | torch.device = "cpu"
) -> LoadedModel:
    """Build ``name`` through open_clip and load ``checkpoint`` into it.

    ``name``: a built-in config (random init without a checkpoint) or an open_clip architecture
    (needs ``checkpoint``). ``checkpoint``: a local file read by ``read_state_dict``. InputError
    for an unknown name (with close matches), an open_clip name without a checkpoint, a missing
    or unsafe file, or weights that do not fit the architecture.
    """
    resolved = _resolve_name(name)
    if checkpoint is None and resolved not in builtin_model_names():
        raise InputError(
            f"model '{name}' needs a local checkpoint (--teacher-checkpoint FILE); "
            "nothing is downloaded"
        )
    state = read_state_dict(checkpoint) if checkpoint is not None else None
    loaded = _create(resolved, device)
    if state is not None:
        load_weights(loaded.model, state, source=str(checkpoint))
        loaded.checkpoint = Path(checkpoint)
    return loaded


def _clip_of(model: nn.Module) -> nn.Module:
    return model.clip if isinstance(model, DistillStudent) else model


def embed_dim_of(model: nn.Module) -> int:
    """Width of the joint embedding space of an open_clip model (a DistillStudent's own width)."""
    clip = _clip_of(model)
    text = getattr(clip, "text", None)
    if text is not None and getattr(text, "output_dim", None):
        return int(text.output_dim)
    projection = getattr(clip, "text_projection", None)
    if isinstance(projection, nn.Linear):
        return projection.out_features
    if isinstance(projection, Tensor):
        return int(projection.shape[1])
    if projection is None and hasattr(clip, "transformer"):
        return int(clip.transformer.width)
    raise ValueError(f"cannot tell the embedding width of {type(clip).__name__}")


def _width_head(student_dim: int, teacher_dim: int) -> nn.Module:
    if student_dim == teacher_dim:
        return nn.Identity()
    head = nn.Linear(student_dim, teacher_dim, bias=False)
    # Orthonormal columns make the head an isometry at init: teacher-edge similarities start
    # equal to the student's own, so early distillation gradients are not scrambled by the head.
    nn.init.orthogonal_(head.weight)
    return head


class DistillStudent(nn.Module):
    """A student CLIP plus the linear head that maps it to the teacher's width.

    The head (``nn.Linear(d_s, d_t, bias=False)``, or ``nn.Identity`` when the widths agree or
    ``teacher_embed_dim`` is None, i.e. no teacher) serves only the teacher-student edges and is
    dropped by ``export_student``. One head for both towers, on purpose: the student's image
    and text embeddings share one space, as the teacher's do, and one linear map keeps it
    shared. With a head per tower, intra_ts alone (the MoTIS baseline) fits each tower to the
    teacher through its own map and leaves the student's native image and text spaces, the
    ones retrieval and export use, unaligned (rsum at chance for a narrower student).
    ``model_cfg`` is the student's open_clip config, kept so the student can be exported.
    """

    def __init__(
        self,
        clip: nn.Module,
        teacher_embed_dim: int | None,
        model_cfg: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.clip = clip
        self.model_cfg = dict(model_cfg) if model_cfg is not None else None
        student_dim = embed_dim_of(clip)
        teacher_embed_dim = teacher_embed_dim or student_dim
        self.teacher_head = _width_head(student_dim, teacher_embed_dim)

    @property
    def logit_scale(self) -> nn.Parameter:
        """The student's learnable log logit scale (``clip.logit_scale``)."""
        return self.clip.logit_scale

    @staticmethod
    def _to_teacher(head: nn.Module, embedding: Tensor) -> Tensor:
        if isinstance(head, nn.Identity):
            return embedding
        return F.normalize(head(embedding), dim=-1)

    def encode(self, images: Tensor, tokens: Tensor) -> dict[str, Tensor]:
        """Embed a batch: images N x 3 x H x W, tokens N x context_length (long).

        Returns "image", "text": N x d_s, L2-normalised; "image_to_teacher", "text_to_teacher":
        N x d_t, the shared head applied to the normalised embedding then renormalised (the
        same tensors as "image"/"text" when the widths agree). Nothing is detached.
        """
        image = F.normalize(self.clip.encode_image(images), dim=-1)
        text = F.normalize(self.clip.encode_text(tokens), dim=-1)
        return {
            "image": image,
            "text": text,
            "image_to_teacher": self._to_teacher(self.teacher_head, image),
            "text_to_teacher": self._to_teacher(self.teacher_head, text),
        }

    def forward(self, images: Tensor, tokens: Tensor) -> dict[str, Tensor]:
        """Same as ``encode``; defined so DDP's forward hooks see the call."""
        return self.encode(images, tokens)


def build_student(
    name: str, teacher_embed_dim: int | None, device: str | torch.device = "cpu"
) -> tuple[DistillStudent, LoadedModel]:
    """A freshly initialised student (any built-in or open_clip name) with a width head as needed.

    ``teacher_embed_dim`` None: no teacher (plain CLIP training), so no heads.
    ``LoadedModel.model`` is the same module as ``DistillStudent.clip``.
    """
    loaded = _create(_resolve_name(name), device)
    student = DistillStudent(loaded.model, teacher_embed_dim, model_cfg=loaded.model_cfg)
    return student.to(device), loaded


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
    clip = _clip_of(student)
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
    clip = _clip_of(model)
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
    state = _clip_of(model).state_dict()
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
    clip = _clip_of(model)
    device = torch.device(device)
    image_size = image_size or clip.visual.image_size[0]
    context_length = context_length or getattr(clip, "context_length", None)
    context_length = context_length or clip.text.context_length
    vocab_size = getattr(clip, "vocab_size", None) or clip.text.vocab_size
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator).to(device)
    tokens = torch.randint(0, vocab_size, (batch_size, context_length), generator=generator)
    tokens = tokens.to(device)
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
