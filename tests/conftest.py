"""Shared fixtures. Importing trainers first makes torchvision importable on CPU torch."""

import trainers  # noqa: F401  (side effect: torchvision compat before any open_clip import)
