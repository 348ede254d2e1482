"""Benchmark the image path: each stage alone, the whole pipeline, and decode vs a plain PIL loop.

    python bench/curate_images.py [--images 160] [--cpus N]

Everything is measured in this one run on the same files:
  * each stage's standalone rate on all cores (a process pool, no Ray);
  * the end-to-end ``winnow curate`` rate on a local Ray (Ray start-up excluded) against the same
    stage chain in a warm process pool, in alternating rounds (``--rounds``), and its ratio to the
    slowest stage;
  * decode+resize images/s per core: winnow's decoder (libjpeg DCT scaling via PIL draft) vs a
    plain PIL open/convert/resize loop to the same size.
Photos come from ../shared/data/images when present, plus generated camera-sized JPEGs.
"""
from __future__ import annotations

import argparse
import glob
import io
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from curation.decode import DecodeConfig, DecodeImages, capped_size, decode_image  # noqa: E402
from curation.metadata_filter import MetadataFilter, MetadataFilterConfig  # noqa: E402
from curation.phash import PHashDedup  # noqa: E402
from pipeline.corpus import load_photos, synth_image  # noqa: E402

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "images")


def make_inputs(root: str, n: int, seed: int = 0, copies: int = 1) -> list[str]:
    """Camera-sized JPEGs (1600-4000 px, with sensor-like noise) plus the shared photos if present.

    ``copies`` > 1 repeats every file under new names (same decode cost, dedup rejects them): a
    longer run without spending minutes generating images, so fixed start-up costs amortise.
    """
    rng = np.random.default_rng(seed)
    photos = load_photos()
    os.makedirs(root, exist_ok=True)
    paths = []
    for i in range(n):
        longest = int(rng.integers(1600, 4001))
        aspect = (4 / 3, 3 / 2, 16 / 9, 1.0, 3 / 4, 2 / 3)[i % 6]
        w, h = (longest, int(longest / aspect)) if aspect >= 1 else (int(longest * aspect), longest)
        arr = np.asarray(synth_image(rng, photos, w, h)).astype(np.int16)
        arr = np.clip(arr + rng.normal(0, 4, arr.shape), 0, 255).astype(np.uint8)
        p = os.path.join(root, f"gen_{i:04d}.jpg")
        Image.fromarray(arr).save(p, "JPEG", quality=int(rng.integers(85, 96)))
        paths.append(p)
    for p in sorted(glob.glob(os.path.join(SHARED, "**", "*.*"), recursive=True)):
        if p.lower().endswith((".jpg", ".jpeg", ".png")):
            dst = os.path.join(root, "shared_" + os.path.basename(p))
            shutil.copy(p, dst)
            paths.append(dst)
    originals = list(paths)
    for c in range(1, copies):
        for p in originals:
            dst = os.path.join(root, f"copy{c}_" + os.path.basename(p))
            shutil.copy(p, dst)
            paths.append(dst)
    return paths


def _read(paths):
    return [open(p, "rb").read() for p in paths]


def _plain_pil(paths, max_side):
    """The baseline a user writes: open, convert, resize to the same capped size."""
    t = time.perf_counter()
    for data in _read(paths):
        img = Image.open(io.BytesIO(data)).convert("RGB")
        img.resize(capped_size(img.width, img.height, max_side), Image.Resampling.BICUBIC)
    return time.perf_counter() - t


def _winnow_decode(paths, max_side, resample="area"):
    cfg = DecodeConfig(max_side=max_side, resample=resample)
    t = time.perf_counter()
    for data in _read(paths):
        decode_image(data, cfg)
    return time.perf_counter() - t


def _psnr(paths, max_side, resample) -> list[float]:
    """Per image: PSNR of winnow's output against the plain full decode + bicubic resize (EXIF
    rotation applied to both; an image stored at its own size counts as identical)."""
    from PIL import ImageOps

    cfg = DecodeConfig(max_side=max_side, resample=resample)
    out = []
    for data in _read(paths):
        ref = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
        ref = np.asarray(ref.resize(capped_size(ref.width, ref.height, max_side), Image.Resampling.BICUBIC),
                         np.float64)
        mse = float(np.mean((np.asarray(decode_image(data, cfg)[0], np.float64) - ref) ** 2))
        out.append(99.0 if mse == 0 else 10 * np.log10(255.0 ** 2 / mse))
    return out


def _stage_rates(paths):
    """Seconds spent in each stage (load, decode, metadata_filter, phash) for these paths."""
    decode, meta, phash = DecodeImages(DecodeConfig()), MetadataFilter(MetadataFilterConfig(min_side=128)), PHashDedup()
    times = {"load": 0.0, "decode": 0.0, "metadata_filter": 0.0, "phash_dedup": 0.0}
    for i in range(0, len(paths), 16):
        chunk = paths[i:i + 16]
        t = time.perf_counter()
        raws = _read(chunk)
        times["load"] += time.perf_counter() - t
        batch = {"raw_bytes": np.array(raws + [None], dtype=object)[:-1]}
        for name, stage in (("decode", decode), ("metadata_filter", meta), ("phash_dedup", phash)):
            t = time.perf_counter()
            batch = stage(batch)
            times[name] += time.perf_counter() - t
    return times


def parallel(fn, paths, workers, *args):
    shares = [paths[i::workers] for i in range(workers)]
    t = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        results = list(pool.map(fn, shares, *[[a] * workers for a in args]))
    return time.perf_counter() - t, results


def zone_plate_psnr(resample: str, shrink: float, n: int = 1600) -> float:
    """Aliasing, as one number: a zone plate (every frequency up to the source's Nyquist) shrunk by
    ``shrink`` with winnow's filter, against PIL's Lanczos (a wide, well anti-aliased filter). A
    filter that lets frequencies above the target's Nyquist through folds them into moire and
    scores lower."""
    from curation.decode import shrink as winnow_shrink

    y, x = np.mgrid[0:n, 0:n].astype(np.float64)
    phase = np.pi * ((x - n / 2) ** 2 + (y - n / 2) ** 2) / n
    plate = Image.fromarray((127.5 + 127.5 * np.cos(phase)).astype(np.uint8))
    size = (round(n / shrink), round(n / shrink))
    ref = np.asarray(plate.resize(size, Image.Resampling.LANCZOS), np.float64)
    got = np.asarray(winnow_shrink(plate, size, resample), np.float64)
    return float(10 * np.log10(255.0 ** 2 / np.mean((got - ref) ** 2)))


def decode_per_core(distinct, max_side, rounds: int = 4) -> None:
    """decode+resize on one core: plain PIL against winnow's decode with each of its filters, with
    PSNR. The decoders take turns, ``rounds`` times, and each keeps its best time: a neighbour's load
    on a shared machine then slows every decoder alike instead of the one that ran during it."""
    import cv2

    cv2.setNumThreads(1)                 # per core: OpenCV's resize on one thread, like PIL's
    filters = ("bicubic", "area", "gaussian")
    best = {name: float("inf") for name in ("plain",) + filters}
    for _ in range(rounds):
        best["plain"] = min(best["plain"], _plain_pil(distinct, max_side))
        for resample in filters:
            best[resample] = min(best[resample], _winnow_decode(distinct, max_side, resample))
    print(f"decode+resize, one core (best of {rounds} interleaved rounds)")
    nd, base = len(distinct), best["plain"]
    print(f"  plain PIL open/convert/resize  {nd / base:8.1f} img/s")
    for resample in filters:
        db = _psnr(distinct, max_side, resample)
        name = resample + (" (default)" if resample == DecodeConfig().resample else "")
        sec = best[resample]
        print(f"  winnow decode_image, {name:<20} {nd / sec:8.1f} img/s   ratio {base / sec:.2f}x   "
              f"PSNR vs full decode + bicubic: min {min(db):.1f} dB, median {float(np.median(db)):.1f} dB")
    print("  aliasing: a zone plate shrunk by 1.25 / 1.6 / 2.4, PSNR against PIL's Lanczos (higher = less moire)")
    for resample in filters:
        scores = " / ".join(f"{zone_plate_psnr(resample, r):.1f}" for r in (1.25, 1.6, 2.4))
        print(f"    {resample:<10} {scores} dB")
    cv2.setNumThreads(0)                 # back to OpenCV's default for what follows


class ChainPool:
    """The stage chain in a warm process pool: each process runs load, decode, metadata_filter and
    phash_dedup on its share in 16-image batches. Started once (processes up, imports done, a few
    images through), then timed round by round."""

    def __init__(self, paths, workers):
        self.shares = [paths[i::workers] for i in range(workers)]
        self.n = len(paths)
        self.pool = ProcessPoolExecutor(workers)
        list(self.pool.map(_stage_rates, [s[:8] for s in self.shares]))

    def seconds(self) -> float:
        t = time.perf_counter()
        list(self.pool.map(_stage_rates, self.shares))
        return time.perf_counter() - t

    def close(self) -> None:
        self.pool.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=120, help="distinct generated images")
    ap.add_argument("--copies", type=int, default=4, help="times each file appears (see make_inputs)")
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    ap.add_argument("--max-side", type=int, default=1024)
    ap.add_argument("--decode-only", action="store_true", help="only the per-core decode comparison")
    ap.add_argument("--engine-only", action="store_true", help="skip the per-core decode comparison")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds of the pool and the engine")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="winnow-bench-")
    try:
        paths = make_inputs(os.path.join(tmp, "images"), args.images, copies=args.copies)
        n = len(paths)
        mpix = sum(Image.open(p).width * Image.open(p).height for p in paths) / n / 1e6
        print(
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; python "
            f"{platform.python_version()}"
        )
        print(f"data: {n} images, mean {mpix:.1f} MP, max_side {args.max_side}; pipeline on {args.cpus} CPUs\n")

        # 1) decode+resize per core vs plain PIL (single process, warm cache, best of 2)
        distinct = paths[: len(paths) // args.copies]
        _read(distinct)
        if not args.engine_only:
            decode_per_core(distinct, args.max_side)
        if args.decode_only:
            return 0
        # 2) each stage alone, and the whole chain, in a plain process pool on all cores (no Ray)
        wall, per_worker = parallel(_stage_rates, paths, args.cpus)
        print(f"\nstages alone ({args.cpus} processes)")
        rates = {}
        for name in per_worker[0]:
            busiest = max(w[name] for w in per_worker)
            rates[name] = n / busiest if busiest > 0 else float("inf")
            print(f"  {name:<16} {rates[name]:10.1f} img/s")
        slowest = min(rates, key=rates.get)

        # 3) the pipeline on a local Ray (start-up excluded) against the warm pool, in alternating
        # rounds: a busy neighbour on a shared machine then slows both sides of a round alike
        import ray

        from pipeline import adapter
        from pipeline.commands import curate
        from pipeline.commands import curate_spec as specmod

        pool = ChainPool(paths, args.cpus)
        adapter.connect(None, args.cpus)      # joins a running cluster rather than clash with it

        def engine(label):
            spec = specmod.parse({"input": {"path": os.path.join(tmp, "images")},
                                  "output": {"path": os.path.join(tmp, f"out_{label}"), "samples_per_shard": 64},
                                  "stages": [{"name": "decode", "max_side": args.max_side},
                                             {"name": "metadata_filter", "min_side": 128}, {"name": "phash_dedup"}],
                                  "ray": {"block_rows": 32}})
            return curate.run(spec, log=None)

        cold = engine("cold")                 # workers start and import
        print(f"\npipeline (winnow curate on local Ray, {args.cpus} CPUs) against the chain in a warm process pool "
              f"(load + decode + metadata_filter + phash_dedup, one process per core: the engine's baseline), "
              f"{args.rounds} alternating rounds; slowest stage alone: {slowest} at {rates[slowest]:.1f} img/s")
        print(f"  cold run (not counted): annotate {n / cold.phases['annotate']:6.1f} img/s")
        pool_s, annotate_s = [], []
        try:
            for r in range(args.rounds):
                pool_s.append(pool.seconds())
                res = engine(f"r{r}")
                annotate_s.append(res.phases["annotate"])
                print(f"  round {r + 1}: pool {n / pool_s[-1]:6.1f} img/s, annotate {n / annotate_s[-1]:6.1f} img/s "
                      f"({annotate_s[-1]:.2f} s): {pool_s[-1] / annotate_s[-1]:.2f}x the pool; whole run "
                      f"{n / res.wall_seconds:6.1f} img/s ({res.wall_seconds:.2f} s); phases {res.phases}")
        finally:
            pool.close()
            ray.shutdown()
        ratios = sorted(p / a for p, a in zip(pool_s, annotate_s, strict=True))
        best = min(pool_s) / min(annotate_s)
        print(f"  engine / pool: median of the rounds {float(np.median(ratios)):.2f}x (range {ratios[0]:.2f}-"
              f"{ratios[-1]:.2f}); best against best {best:.2f}x ({n / min(annotate_s):.1f} vs "
              f"{n / min(pool_s):.1f} img/s); best annotate {n / min(annotate_s) / rates[slowest]:.2f}x the slowest "
              f"stage alone")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
