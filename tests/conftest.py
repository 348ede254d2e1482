"""Shared fixtures: one local Ray (2 CPUs, like CI) for the session, and small seeded corpora."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def pytest_collection_modifyitems(config, items):
    """``slow`` tests run with WINNOW_SLOW=1 (CI does) or when ``-m`` asks for them."""
    if os.environ.get("WINNOW_SLOW") == "1" or config.option.markexpr:
        return
    skip = pytest.mark.skip(reason="slow end-to-end test: WINNOW_SLOW=1 make test runs it (CI does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


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


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """A curated image run's shard: 8 JPEGs of 64x64 with captions and their annotation rows."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from pipeline.contract import tar as tars

    root = tmp_path_factory.mktemp("img_run")
    shards = root / "shards"
    shards.mkdir()
    rng = np.random.default_rng(0)
    blocks, rows = [], []
    for i in range(8):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
        key = f"{i:09d}"
        blocks += [tars.block(f"{key}.jpg", buf.getvalue()), tars.block(f"{key}.txt", f"picture {i}".encode())]
        rows.append({"key": key, "status": "kept", "caption": f"picture {i}", "width": 64, "height": 64,
                     "stored_width": 64, "stored_height": 64})
    blocks.append(tars.end(sum(len(b) for b in blocks)))
    (shards / "00000.tar").write_bytes(b"".join(blocks))
    pq.write_table(pa.Table.from_pylist(rows), str(shards / "00000.parquet"))
    return str(root)
