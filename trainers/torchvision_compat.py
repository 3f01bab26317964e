"""Make PyPI's torchvision importable next to a CPU-only torch build.

PyPI ships torchvision 0.28 built against CUDA torch. Next to torch's CPU build its C extension
does not load, and ``torchvision._meta_registrations`` then fails at import with
"operator torchvision::nms does not exist" because it registers fake kernels for ``nms`` and
``qnms`` unconditionally. Declaring those two schemas first lets the import succeed; only
``torchvision.ops.nms`` stays unusable, and nothing in conaclip (or open_clip's CLIP models)
calls it. With a matching torch/torchvision pair the extension declares the schemas itself and
this module does nothing.
"""

from __future__ import annotations

import functools
import importlib.metadata
import sys

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


def _needs_schemas() -> bool:
    import torch

    if "torchvision" in sys.modules or torch.version.cuda is not None:
        return False
    try:
        torchvision_version = importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:
        return False
    # A CPU torchvision build carries a "+cpu" local version and registers its own schemas.
    return "+cpu" not in torchvision_version


# functools.cache keeps the returned Library alive for the process: a collected Library
# deregisters its schemas, and torchvision needs them for as long as it is imported.
@functools.cache
def ensure_torchvision_importable() -> object | None:
    """Declare torchvision::nms/qnms when torchvision's extension cannot. Idempotent.

    Returns the ``torch.library.Library`` holding the schemas, or None when nothing was needed.
    Must run before torchvision is first imported (``import trainers`` does it).
    """
    if not _needs_schemas():
        return None
    import torch

    try:
        torch.ops.torchvision.nms.default  # noqa: B018 - raises when the schema is missing
        return None
    except (AttributeError, RuntimeError):
        pass
    library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        library.define(schema)
    return library
