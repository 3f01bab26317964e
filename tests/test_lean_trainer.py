"""orchestrator.lean_trainer: Ray's own callback list, minus Ray Data's when there are no
datasets (no Ray cluster needed: the list is built before ``fit`` starts anything)."""

from __future__ import annotations

import ray.train
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks import DatasetsCallback

from orchestrator.lean_trainer import LeanTorchTrainer


def _callback_types(trainer: TorchTrainer) -> list[type]:
    return [type(callback) for callback in trainer._create_default_callbacks()]


def _noop() -> None:
    return None


def test_without_datasets_only_the_ray_data_callback_is_dropped():
    scaling = ray.train.ScalingConfig(num_workers=1)
    ray_types = _callback_types(TorchTrainer(_noop, scaling_config=scaling))
    lean_types = _callback_types(LeanTorchTrainer(_noop, scaling_config=scaling))
    assert ray_types.count(DatasetsCallback) == 1
    assert lean_types == [kind for kind in ray_types if kind is not DatasetsCallback]
    # The placement-group cleaner (what frees a dead controller's CPUs) stays.
    assert any(kind.__name__ == "PlacementGroupCleanerCallback" for kind in lean_types)


def test_with_datasets_the_list_is_rays_own():
    scaling = ray.train.ScalingConfig(num_workers=1)
    lean = LeanTorchTrainer(_noop, scaling_config=scaling)
    lean.datasets = {"train": object()}  # what a caller with Ray Data datasets would hold
    plain = TorchTrainer(_noop, scaling_config=scaling)
    assert _callback_types(lean) == _callback_types(plain)
