"""How the driver's costs grow with the number of rows: sweep, select's plan and the report, on
synthetic run folders of 10^4 .. 10^6 (or more) annotation rows, each step in a fresh process so
its peak RSS is its own. The rows are annotation metadata only (LAION-like scores, captions,
reject reasons; 100,000 rows per shard table), no images: these steps read the tables, not the
pictures (the report's example thumbnails are missing here and shown as such).

Prints, per step and size: wall seconds, microseconds per row, peak RSS, and RSS above the
process's baseline (imports) per row; the goal is time per row flat within 2x and the driver's
memory bounded by a constant plus <= 100 bytes per row.

    python bench/scale.py [--sizes 10000 100000 1000000] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

PER_SHARD = 100_000
REASONS = ["ocr_area_ratio: 0.31 > 0.1", "duplicate", "decode_error: truncated file", "too_small: 90x60",
           "clip_similarity: 0.12 < 0.2"]


def make_run(root: str, n: int, seed: int = 0) -> str:
    """A run folder whose shards/NNNNN.parquet hold ``n`` rows (kept and rejected, with scores)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.contract import layout

    run = os.path.join(root, f"run_{n}")
    shards = os.path.join(run, layout.SHARDS_DIR)
    os.makedirs(shards, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = np.array("a dog cat street night car photo of the on in red blue small large people".split())
    for p, start in enumerate(range(0, n, PER_SHARD)):
        m = min(PER_SHARD, n - start)
        kept = rng.random(m) < 0.8
        reason = np.where(kept, None, np.array(REASONS, dtype=object)[rng.integers(0, len(REASONS), m)])
        caption = [" ".join(words[rng.integers(0, len(words), k)]) for k in rng.integers(0, 12, m)]
        t = pa.table({
            "key": [f"{p:05d}{i:06d}" for i in range(m)], "source": [f"part-{p:05d}.parquet"] * m,
            "partition": np.full(m, p, np.int64), "caption": caption,
            "status": np.where(kept, "kept", "rejected").astype(object), "reject_reason": reason,
            "width": rng.integers(256, 4000, m), "height": rng.integers(256, 4000, m),
            "stored_width": rng.integers(256, 1024, m), "stored_height": rng.integers(256, 1024, m),
            "aesthetic_score": rng.normal(5, 1, m), "clip_similarity": rng.normal(0.3, 0.05, m),
            "ocr_area_ratio": rng.beta(1, 20, m), "watermark_prob": rng.random(m), "phash": rng.integers(0, 2 ** 62, m),
        })
        pq.write_table(t, os.path.join(shards, f"{p:05d}.parquet"))
        with open(os.path.join(shards, f"{p:05d}_stats.json"), "w") as fh:
            json.dump({"shard": f"{p:05d}", "partition": p, "count": m, "kept": int(kept.sum()),
                       "rejected": int(m - kept.sum()), "reasons": {}, "stage_seconds": {}, "stage_rss_mb": {}}, fh)
    with open(os.path.join(run, layout.SUMMARY_FILE), "w") as fh:
        json.dump({"inputs": n, "kept": 0, "rejected": 0, "reasons": {}, "stage_seconds": {}, "wall_seconds": 0,
                   "phases": {}, "warnings": []}, fh)
    return run


def make_tars(run: str) -> None:
    """Beside each shard table, the shard's tar: one small JPEG member per kept row (the training
    index reads the tar headers and the table, never the pixels), as ``winnow curate`` writes them."""
    import io
    import tarfile

    import pyarrow.parquet as pq
    from PIL import Image

    from pipeline.contract import layout

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 80, 40)).save(buf, "JPEG")
    data = buf.getvalue()
    shards = os.path.join(run, layout.SHARDS_DIR)
    for name in sorted(f for f in os.listdir(shards) if f.endswith(".parquet")):
        t = pq.read_table(os.path.join(shards, name), columns=["key", "status"])
        tar_path = os.path.join(shards, name[:-len(".parquet")] + ".tar")
        with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, status in zip(t.column("key").to_pylist(), t.column("status").to_pylist(), strict=True):
                if status == "kept":
                    info = tarfile.TarInfo(f"{key}.jpg")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def make_input(root: str, n: int, seed: int = 0) -> str:
    """A LAION-style parquet of ``n`` rows for ``curate``: 1 % name one of 64 real JPEGs (small,
    each different), 9 % an https URL (rejected while planning: winnow does not download), 90 % a
    file that is not there (rejected when loaded). Returns the parquet's path."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    folder = os.path.join(root, f"input_{n}")
    images = os.path.join(folder, "images")
    os.makedirs(images, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(64):
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(os.path.join(images, f"{i}.jpg"))
    kind = rng.random(n)
    idx = np.arange(n)
    path = np.where(kind < 0.01, np.char.add(np.char.add("images/", (idx % 64).astype(str)), ".jpg"),
                    np.where(kind < 0.10, np.char.add("https://example.com/", idx.astype(str)),
                             np.char.add("images/missing_", idx.astype(str))))
    pq.write_table(pa.table({"path": path.astype(object), "caption": np.char.add("photo ", idx.astype(str))}),
                   os.path.join(folder, "meta.parquet"))
    return os.path.join(folder, "meta.parquet")


def _memory_kb() -> tuple[int, int]:
    """(resident now, peak resident) of this process in KiB. Linux: VmRSS and VmHWM of this process's
    own memory map. Not ``ru_maxrss``: it survives exec, so a child started by a parent that had
    just made a large input begins with the parent's peak (this bench measured growth from there
    before 2026-12-06's third run, which understated it)."""
    try:
        with open("/proc/self/status") as fh:
            fields = dict(line.split(":", 1) for line in fh if ":" in line)
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])
    except (OSError, KeyError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak, peak


def step(name: str, run: str, out: str) -> dict:
    """Run one step in this process (called in a child); returns its seconds, peak RSS, and how much
    the peak grew over the process after its imports."""
    from pipeline.commands import report, select, sweep

    if name == "train_index":
        import training.loader  # noqa: F401 - torch and the loader imported before the baseline is taken
    base = _memory_kb()[0]
    t = time.perf_counter()
    if name == "sweep":
        sweep.run(sweep.parse({"annotations": [run], "output": out, "plots": True, "sheets": {"per_side": 0},
                               "filters": [{"column": "aesthetic_score", "drop_fractions": [0.125, 0.25, 0.5]},
                                           {"column": "clip_similarity", "drop_fractions": [0.25]},
                                           {"column": "words(caption)", "thresholds": [3]}]}))
    elif name == "select_plan":
        select.plan(select.parse({"runs": [run], "output": {"path": out},
                                  "filters": [{"column": "aesthetic_score", "drop_fractions": [0.5]}]}))
    elif name == "train_index":   # one process: the per-shard tasks' work and the driver's table together
        from training.index import build_index

        os.makedirs(out, exist_ok=True)
        table, _ = build_index(run, out)
        from training.index import Strings
        from training.loader import SampleReader  # what each training worker holds per index row

        reader, captions = SampleReader(table), Strings(table.column("caption"))
        assert reader.read(table.num_rows - 1)[:2] == b"\xff\xd8" and captions[0] is not None
        reader.close()
    elif name == "report":
        os.makedirs(out, exist_ok=True)
        report.write(run, os.path.join(out, "report.html"))
    elif name == "curate":      # run: the input parquet; the driver is this process, Ray's workers report theirs
        from pipeline.commands import curate, curate_spec

        result = curate.run(curate_spec.parse({"input": {"path": run, "format": "laion_parquet"},
                                               "output": {"path": out, "samples_per_shard": 100_000, "report": False},
                                               "stages": [{"name": "decode", "max_side": 128},
                                                          {"name": "phash_dedup"}]}), log=None)
        seconds = time.perf_counter() - t
        peak = _memory_kb()[1]
        import ray

        ray.shutdown()
        return {"seconds": seconds, "peak_mb": peak / 1024, "grew_mb": (peak - base) / 1024,
                "phases": result.phases, "kept": result.kept, "rejected": result.rejected,
                "worker_rss_mb": result.stage_rss_mb}
    seconds = time.perf_counter() - t
    peak = _memory_kb()[1]
    return {"seconds": seconds, "peak_mb": peak / 1024, "grew_mb": (peak - base) / 1024}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--steps", nargs="+", default=["sweep", "select_plan", "report"],
                    help="sweep, select_plan, report (on annotation tables), train_index (the tables plus a tar "
                         "of tiny JPEGs per shard: the training index built in one process, and a training worker's "
                         "sample reader and captions over it), curate (a LAION-style parquet through "
                         "plan, annotate, dedup and shard writing on a local Ray)")
    ap.add_argument("--keep", help="make the runs here and keep them")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(step(*args.child)))
        return 0
    root = args.keep or tempfile.mkdtemp(prefix="winnow-scale-")
    try:
        rows = []
        for n in args.sizes:
            t = time.perf_counter()
            tables = [s for s in args.steps if s != "curate"]
            run = make_run(root, n) if tables else None
            if "train_index" in args.steps:
                make_tars(run)
            inp = make_input(root, n) if "curate" in args.steps else None
            print(f"{n:>10,} rows: inputs made in {time.perf_counter() - t:.1f} s", flush=True)
            for name in args.steps:
                out = os.path.join(root, f"{name}_{n}")
                shutil.rmtree(out, ignore_errors=True)
                res = subprocess.run([sys.executable, __file__, "--child", name, inp if name == "curate" else run, out],
                                     capture_output=True, text=True, cwd=ROOT)
                if res.returncode:
                    print(res.stderr[-2000:])
                    return 1
                r = {"step": name, "rows": n, **json.loads(res.stdout.strip().splitlines()[-1])}
                rows.append(r)
                print(f"  {name:<12} {r['seconds']:8.2f} s  {1e6 * r['seconds'] / n:8.2f} us/row  peak "
                      f"{r['peak_mb']:7.0f} MB  grew {r['grew_mb']:7.0f} MB ({r['grew_mb'] * 2 ** 20 / n:6.0f} B/row)",
                      flush=True)
                if name == "curate":
                    print(f"      kept {r['kept']:,}, rejected {r['rejected']:,}; phases "
                          f"{ {k: round(v, 2) for k, v in r['phases'].items()} }; worker peak RSS "
                          f"{ {k: round(v) for k, v in r['worker_rss_mb'].items()} } MB", flush=True)
        print("marginal cost between sizes (the goal: time per row flat within 2x; <= 100 B/row of memory):")
        for name in args.steps:
            mine = [r for r in rows if r["step"] == name]
            for a, b in zip(mine, mine[1:], strict=False):
                dn = b["rows"] - a["rows"]
                us = 1e6 * (b["seconds"] - a["seconds"]) / dn
                print(f"  {name:<12} {a['rows']:>10,} -> {b['rows']:>10,}: {us:7.2f} us/row, "
                      f"{(b['grew_mb'] - a['grew_mb']) * 2 ** 20 / dn:6.0f} B/row")
        print(json.dumps(rows))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
