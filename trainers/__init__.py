"""Everything that runs inside one distillation trial. Knows nothing of Ray Tune or MLflow."""

from trainers.torchvision_compat import ensure_torchvision_importable

ensure_torchvision_importable()
