"""Shared fixtures. Importing trainers first makes torchvision importable on CPU torch."""

import pytest

import trainers  # noqa: F401  (side effect: torchvision compat before any open_clip import)


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory):
    """A small built-in data set (real shards): 600 train samples in 3 shards, 60 eval images."""
    from trainers.synth_shards import synthesize

    root = tmp_path_factory.mktemp("shapes")
    return synthesize(
        root, train_samples=600, eval_images=60, seed=7, progress=False, samples_per_shard=200
    )


@pytest.fixture(scope="session")
def tiny_teacher(tiny_shapes, tmp_path_factory):
    """The built-in teacher architecture after a few CLIP steps, exported like a real teacher."""
    from trainers.teacher import teacher_config, train_teacher

    cfg = teacher_config(
        str(tiny_shapes.out_dir / "train"),
        str(tiny_shapes.out_dir / "eval"),
        steps=4,
        batch_size=16,
        loader_workers=0,
    )
    return train_teacher(cfg, tmp_path_factory.mktemp("teachers"))


@pytest.fixture(scope="session")
def local_ray():
    """A real local Ray cluster for this test session, ended with ray.shutdown (never ray stop)."""
    import ray

    if not ray.is_initialized():
        from orchestrator.ray_cluster import start_local_cluster

        # A new cluster, never one a previous test's `ray start` left a record of.
        start_local_cluster(num_cpus=2, log_to_driver=False)
    yield ray
    ray.shutdown()
