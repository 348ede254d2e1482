"""Loader throughput per core at bucket bases 256 and 512, and the data-wait share of tiny training.

    python bench/loader.py [--samples 480]

The shared photos (../shared/data/images) are curated first (decode, stored at <= 1024 px, as a
real shard set would be), indexed, then read through ``BucketLoader`` with 1 and 2 decode
threads. The baseline, measured in the same run on the same samples, is the loader a diffusers
training script uses: full-size PIL decode, resize of the shorter side, crop, one thread. Last, a
tiny SD trains for 30 steps on 1 Ray Train worker at base 256 and reports the share of step time
spent waiting for data.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
sys.path.insert(0, ROOT)

IMAGES = os.path.join(ROOT, "..", "shared", "data", "images")


def naive(reader, ids, table, bucket_of) -> float:
    """Decode at full size, resize to cover, centre crop (what most training scripts do)."""
    from training.buckets import plan_crop

    t = time.perf_counter()
    for i in ids:
        bucket = table[int(bucket_of[i])]
        with Image.open(io.BytesIO(reader.read(i))) as im:
            rgb = im.convert("RGB")
        c = plan_crop(rgb.width, rgb.height, bucket)
        rgb = rgb.resize((c.resize_w, c.resize_h), Image.BICUBIC).crop(
            (c.left, c.top, c.left + bucket.width, c.top + bucket.height))
        np.asarray(rgb)
    return len(ids) / (time.perf_counter() - t)


def loader_rate(index, table, bucket_of, threads: int, samples: int) -> float:
    from training.loader import BucketLoader
    from training.schedule import Cursor

    loader = BucketLoader(index, table, bucket_of, Cursor(), batch_size=8, workers=threads, prefetch=4, seed=0)
    n, t = 0, time.perf_counter()
    for batch in loader:
        n += len(batch.ids)
        if n >= samples:
            break
    rate = n / (time.perf_counter() - t)
    loader.close()
    return rate


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=480)
    args = parser.parse_args()
    if not os.path.isdir(IMAGES):
        print(f"skipped: {IMAGES} not found")
        return 0
    from pipeline import adapter
    from pipeline.commands import curate
    from pipeline.commands import curate_spec as specmod
    from training.index import bucket_ids, build_index
    from training.loader import SampleReader

    work = tempfile.mkdtemp(prefix="winnow-bench-loader-")
    adapter.connect(None, os.cpu_count())          # joins a running cluster rather than clash with it
    spec = specmod.parse({"input": {"path": IMAGES}, "output": {"path": os.path.join(work, "run")},
                          "stages": [{"name": "decode", "max_side": 1024}]})
    result = curate.run(spec, log=None)
    index, _ = build_index(os.path.join(work, "run"), work)
    sizes = np.stack([index.column("width").to_numpy(), index.column("height").to_numpy()], 1)
    print(f"{index.num_rows} photos curated ({result.kept} kept), stored sizes {sizes.min(0)}..{sizes.max(0)} (w, h); "
          f"{os.cpu_count()} cores")
    print("| base | loader, 1 thread | loader, 2 threads | baseline (full decode, 1 thread) | 1-thread speed-up |")
    print("| --- | --- | --- | --- | --- |")
    reader = SampleReader(index)
    for base in (256, 512):
        table, bucket_of = bucket_ids(index, base, 64, 2.0)
        one = loader_rate(index, table, bucket_of, 1, args.samples)
        two = loader_rate(index, table, bucket_of, 2, args.samples)
        ids = [i % index.num_rows for i in range(min(args.samples, 3 * index.num_rows))]
        base_rate = naive(reader, ids, table, bucket_of)
        print(
            f"| {base} | {one:.1f} samples/s | {two:.1f} samples/s | {base_rate:.1f} samples/s "
            f"| {one / base_rate:.2f}x |"
        )

    from pipeline.commands import train as trainer
    from training import train_spec as trainspec

    out = os.path.join(work, "train")
    tspec = trainspec.parse({"data": {"shards": [os.path.join(work, "run")], "resolution": 256, "workers": 2},
                             "model": {"kind": "sd"}, "output": {"path": out},
                             "train": {"batch_size": 4, "max_steps": 30, "checkpoint_every": 30, "log_every": 1,
                                       "sample_prompts": []},
                             "ray": {"num_workers": 1}})
    res = trainer.run(tspec, log=None)
    steady = [m for m in res.metrics if m["step"] > 5]
    print(f"tiny SD training at base 256, 1 worker, batch 4, 2 decode threads: "
          f"{np.mean([m['samples_per_s'] for m in steady]):.1f} samples/s, "
          f"data wait {100 * np.mean([m['data_wait'] for m in steady]):.1f} % of step time (steps 6-30)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
