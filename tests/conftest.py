"""Shared fixtures: one local Ray (2 CPUs, like CI) for the session, and small seeded corpora."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().execution_no_progress_timeout_s = 120  # a hang fails the test
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """40 images + 4 resized duplicates + 10 bad/odd files; returns (root, expected outcomes)."""
    from pipeline.corpus import make_corpus

    root = tmp_path_factory.mktemp("corpus")
    expected = make_corpus(str(root), n_images=40, seed=1, max_side=900)
    return str(root), expected
