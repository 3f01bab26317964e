"""Teacher and student dual encoders built through open_clip, and local checkpoints.

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


def register_config_file(path: str | Path) -> str:
    """Register one open_clip model config file (``NAME.json``) and return NAME.

    The file holds what open_clip's own configs hold: ``embed_dim``, ``vision_cfg`` and
    ``text_cfg``. Registration is per process (open_clip keeps a module-level registry), so
    every process that builds the model calls this, which ``load_model`` does. InputError
    naming the file for a missing or unreadable file, a missing field, or a NAME open_clip
    already resolves to a different config (registering it would silently replace that
    architecture in this process).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"model config {path} not found (expected an open_clip model .json)")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"model config {path}: not readable as JSON: {error}") from error
    if not isinstance(config, dict):
        raise InputError(f"model config {path}: expected a JSON object")
    for key, kind, wanted in (
        ("embed_dim", int, "an integer"),
        ("vision_cfg", dict, "an object"),
        ("text_cfg", dict, "an object"),
    ):
        if not isinstance(config.get(key), kind) or isinstance(config.get(key), bool):
            raise InputError(
                f"model config {path}: field {key}: expected {wanted}, as in open_clip's configs"
            )
    name = path.stem
    known = open_clip.get_model_config(name)
    if known == config:
        return name
    if known is not None:
        raise InputError(
            f"model config {path}: open_clip already has an architecture '{name}' with another "
            "config; rename the file"
        )
    open_clip.add_model_config(path)
    return name


def model_label(name: str) -> str:
    """The name a model goes by: a config file's NAME (``path/NAME.json``), else ``name``.
    Needs no registry, so folder names can use it before anything is built."""
    return Path(name).stem if is_config_file(name) else name


def is_config_file(name: str) -> bool:
    """Whether a model name is the path of an open_clip model config file."""
    return name.endswith(".json")


def resolve_model_name(name: str) -> str:
    """The open_clip registry name for ``name``, registering the built-in configs (and
    ``name`` itself when it is a config file, ``register_config_file``) with open_clip first;
    InputError when it names nothing local."""
    if is_config_file(name):
        register_builtin_configs()
        return register_config_file(name)
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

    ``name``: a built-in config (random init without a checkpoint), an open_clip architecture
    or the path of an open_clip model config ``.json`` (both need ``checkpoint``).
    ``checkpoint``: a local file read by ``read_state_dict``. InputError
    for an unknown name (with close matches), an open_clip name without a checkpoint, a missing
    or unsafe file, or weights that do not fit the architecture.
    """
    resolved = resolve_model_name(name)
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


def clip_of(model: nn.Module) -> nn.Module:
    """The open_clip model itself: a DistillStudent's ``clip``, any other model as it is."""
    return model.clip if isinstance(model, DistillStudent) else model


def embed_dim_of(model: nn.Module) -> int:
    """Width of the joint embedding space of an open_clip model (a DistillStudent's own width)."""
    clip = clip_of(model)
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
    loaded = _create(resolve_model_name(name), device)
    student = DistillStudent(loaded.model, teacher_embed_dim, model_cfg=loaded.model_cfg)
    return student.to(device), loaded
