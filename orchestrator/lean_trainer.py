"""A ``TorchTrainer`` that starts no Ray Data actor when it is given no datasets.

Ray Train 2.x (V2) starts a ``DatasetManager`` actor for every ``fit()``, with or without
datasets: one more Python process per trial that imports ``ray.data`` (about 2 CPU-seconds
here) and is never called when the loop reads its own WebDataset shards. On a small node
running two trials at once that CPU comes out of the other trial's training. Everything else
(controller, worker group, checkpoints, failure handling, the placement-group cleaner that
removes a dead controller's resources) is Ray's, unchanged.
"""

from __future__ import annotations

from typing import Any

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks import DatasetsCallback


class LeanTorchTrainer(TorchTrainer):
    """``TorchTrainer`` minus the Ray Data callback when ``datasets`` is empty."""

    def _create_default_callbacks(self) -> list[Any]:
        callbacks = super()._create_default_callbacks()
        if self.datasets:
            return callbacks
        return [callback for callback in callbacks if not isinstance(callback, DatasetsCallback)]
