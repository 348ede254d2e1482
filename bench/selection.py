"""`winnow select` and `winnow report` on a synthetic shard set: samples/s and MB/s.

    python bench/selection.py [--shards 16] [--per-shard 1000] [--fraction 0.5]

A run folder in img2dataset layout (JPEG + caption + JSON per sample, an annotation parquet per
shard, annotations.parquet) is written to a temp folder; `winnow select` keeps the top half by
aesthetic score into new shards of the same size. The baseline in the same run is what a user
writes by hand: stream every source tar with Python's tarfile, keep the selected members, and
write the new tars (one process, every byte read). Both outputs hold the same samples.
Last, the report of the source run is written and timed.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
sys.path.insert(0, ROOT)


def make_run(root: str, shards: int, per_shard: int, rng: np.random.Generator) -> int:
    from PIL import Image

    from pipeline.contract import tar as tars

    images = []
    for i in range(24):   # distinct photo-like JPEGs (smooth gradients + noise), ~30-60 KB each
        w, h = [(512, 384), (384, 512), (448, 448)][i % 3]
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([(x * (i + 1) % 256), (y * 3 % 256), ((x + y) * 2 % 256)], -1).astype(np.float32)
        arr = np.clip(base + rng.normal(0, 18, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        images.append((buf.getvalue(), w, h))
    os.makedirs(os.path.join(root, "shards"))
    tables, total = [], 0
    for s in range(shards):
        rows = []
        with open(os.path.join(root, "shards", f"{s:05d}.tar"), "wb") as fh:   # streamed, as a writer would
            size = 0
            for j in range(per_shard):
                key = f"{s:05d}{j:04d}"
                data, w, h = images[(s * per_shard + j) % len(images)]
                row = {"key": key, "partition": s, "status": "kept", "reject_reason": None,
                       "caption": f"sample {key}", "width": w, "height": h, "stored_width": w, "stored_height": h,
                       "aesthetic_score": float(rng.normal(5, 1)), "source": f"img_{key}.jpg", "image_ext": "jpg"}
                for name, blob in ((f"{key}.jpg", data), (f"{key}.txt", row["caption"].encode()),
                                   (f"{key}.json", json.dumps(row).encode())):
                    size += fh.write(tars.block(name, blob))
                rows.append(row)
                total += len(data)
            fh.write(tars.end(size))
        t = pa.Table.from_pylist(rows)
        pq.write_table(t, os.path.join(root, "shards", f"{s:05d}.parquet"))
        with open(os.path.join(root, "shards", f"{s:05d}_stats.json"), "w") as fh:
            json.dump(
                {
                    "shard": f"{s:05d}",
                    "count": per_shard,
                    "kept": per_shard,
                    "rejected": 0,
                    "reasons": {},
                    "stage_seconds": {},
                    "tar_bytes": os.path.getsize(os.path.join(root, "shards", f"{s:05d}.tar")),
                },
                fh,
            )
        tables.append(t)
    pq.write_table(pa.concat_tables(tables), os.path.join(root, "annotations.parquet"))
    with open(os.path.join(root, "summary.json"), "w") as fh:
        json.dump({"inputs": shards * per_shard, "kept": shards * per_shard, "rejected": 0, "reasons": {},
                   "stage_seconds": {}, "phases": {}, "wall_seconds": 0}, fh)
    return total


def baseline(run: str, keys: set[str], out: str, per_shard: int) -> int:
    """Stream every tar, keep the selected members, write new tars of ``per_shard`` samples."""
    os.makedirs(out)
    n, part, cur, current = 0, 0, None, set()
    for name in sorted(os.listdir(os.path.join(run, "shards"))):
        if not name.endswith(".tar"):
            continue
        with tarfile.open(os.path.join(run, "shards", name)) as src:
            for m in src:
                key = m.name.rpartition(".")[0]
                if key not in keys:
                    continue
                if key not in current:
                    if cur is None or len(current) == per_shard:
                        if cur is not None:
                            cur.close()
                            part += 1
                        cur = tarfile.open(os.path.join(out, f"{part:05d}.tar"), "w", format=tarfile.USTAR_FORMAT)
                        current = set()
                    current.add(key)
                    n += 1
                cur.addfile(m, src.extractfile(m))
    if cur is not None:
        cur.close()
    return n


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--fraction", type=float, default=0.5, help="share of samples dropped (bottom by aesthetic)")
    args = parser.parse_args()
    import ray

    from pipeline import adapter
    from pipeline.commands import report
    from pipeline.commands import select as selection

    rng = np.random.default_rng(0)
    work = tempfile.mkdtemp(prefix="winnow-bench-select-")
    run = os.path.join(work, "run")
    t = time.perf_counter()
    image_bytes = make_run(run, args.shards, args.per_shard, rng)
    n = args.shards * args.per_shard
    tar_mb = sum(os.path.getsize(os.path.join(run, "shards", f)) for f in os.listdir(os.path.join(run, "shards"))
                 if f.endswith(".tar")) / 1e6
    print(f"source: {n} samples in {args.shards} shards, {tar_mb:.0f} MB of tar "
          f"(mean image {image_bytes / n / 1e3:.0f} KB), made in {time.perf_counter() - t:.1f} s")
    adapter.connect(None, None)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    spec = selection.parse(
        {
            "runs": [run],
            "output": {"path": os.path.join(work, "sel"), "samples_per_shard": args.per_shard, "report": False},
            "filters": [{"column": "aesthetic_score", "drop_fractions": [args.fraction]}],
        }
    )
    t = time.perf_counter()
    p = selection.plan(spec)
    plan_s = time.perf_counter() - t
    t = time.perf_counter()
    r = selection.run(spec, log=None)
    sel_s = time.perf_counter() - t
    out_mb = sum(os.path.getsize(os.path.join(work, "sel", "shards", f))
                 for f in os.listdir(os.path.join(work, "sel", "shards")) if f.endswith(".tar")) / 1e6
    keys = set(p.table.column("key").to_pylist())
    t = time.perf_counter()
    nb = baseline(run, keys, os.path.join(work, "base"), args.per_shard)
    base_s = time.perf_counter() - t
    assert nb == r.selected == len(keys)
    print(f"winnow select ({cpus} CPUs, Ray running): {r.selected} of {n} samples, {r.shards} shards, {out_mb:.0f} MB "
          f"in {sel_s:.2f} s (plan {plan_s:.2f} s) = {r.selected / sel_s:,.0f} samples/s, {out_mb / sel_s:,.0f} MB/s")
    print(f"baseline (stream every tar, 1 process): {nb} samples in {base_s:.2f} s = {nb / base_s:,.0f} samples/s, "
          f"{out_mb / base_s:,.0f} MB/s written, {tar_mb / base_s:,.0f} MB/s read")
    print(f"ratio: select is {base_s / sel_s:.2f}x the baseline's speed")
    t = time.perf_counter()
    report.write(run, os.path.join(work, "report.html"))
    print(f"report of the {n}-sample source run: {time.perf_counter() - t:.2f} s, "
          f"{os.path.getsize(os.path.join(work, 'report.html')) / 1e3:.0f} KB")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
