"""Check ``winnow curate --dry-run``'s projections against the real run, on the same input and cluster.

    python bench/dry_run.py [--images 1500] [--sample 256] [--cpus N] [--stages demo|light]

A generated corpus (``pipeline.corpus``: photos cut to every aspect ratio and size, near-duplicates,
and every kind of bad file) is curated twice in one process on one local Ray: first the dry run
(a sample of ``--sample`` inputs), then the real run. Printed: projected vs measured wall time,
output bytes and kept fraction, with the issue's bounds (1.5x for time and bytes, 0.1 for the
kept fraction). Exit status 1 when a bound is missed. The order (dry run first) is the user's:
the dry run pays Ray's start-up, which its projection leaves out, as the real run's wall time does.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline import adapter  # noqa: E402
from pipeline.commands import curate, curate_spec, dry_run  # noqa: E402
from pipeline.contract import layout  # noqa: E402
from pipeline.corpus import make_corpus  # noqa: E402

STAGES = {
    "demo": ["decode", {"name": "metadata_filter", "min_side": 128, "max_aspect_ratio": 4.0},
             {"name": "phash_dedup", "max_distance": 4},
             {"name": "clip", "model": "winnow-tiny-clip", "pretrained": "random"},
             {"name": "aesthetic", "weights": "random"},
             {"name": "ocr", "backend": "rapidocr", "max_side": 512, "max_area_ratio": 0.1}],
    "light": ["decode", {"name": "metadata_filter", "min_side": 128, "max_aspect_ratio": 4.0},
              {"name": "phash_dedup", "max_distance": 4}],
}


def output_bytes(out: str) -> int:
    """What the dry run projects: everything the run leaves except its small fixed files."""
    skip = {curate.SPEC_FILE, layout.SUMMARY_FILE, layout.CARD_FILE, layout.REPORT_FILE}
    total = 0
    for root, _, files in os.walk(out):
        for f in files:
            if not (root == out and f in skip):
                total += os.path.getsize(os.path.join(root, f))
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1500)
    ap.add_argument("--sample", type=int, default=256)
    ap.add_argument("--cpus", type=int, default=None)
    ap.add_argument("--stages", choices=sorted(STAGES), default="demo")
    ap.add_argument("--samples-per-shard", type=int, default=250)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="winnow-bench-dry-run-")
    try:
        corpus = os.path.join(tmp, "corpus")
        expected = make_corpus(corpus, n_images=args.images, seed=7, text_images=args.images // 20)
        print(f"corpus: {len(expected)} files ({sum(v is not None for v in expected.values())} expected rejects)")

        def spec(out: str, dry: bool):
            return curate_spec.parse(
                {
                    "input": {"path": corpus},
                    "output": {
                        "path": os.path.join(tmp, out),
                        "samples_per_shard": args.samples_per_shard,
                        "report": False,
                    },
                    "stages": STAGES[args.stages],
                    "ray": {"num_cpus": args.cpus, "progress_bars": False},
                    "dry_run": {"enabled": dry, "sample": args.sample},
                }
            )

        projected = curate.run(spec("run", True), log=None)
        print(dry_run.format_summary(projected))
        assert not os.path.exists(os.path.join(tmp, "run")), "the dry run wrote into the output folder"
        real = curate.run(spec("run", False), log=None)
        real_bytes = output_bytes(os.path.join(tmp, "run"))
        kept = real.kept / real.inputs
        shape = adapter.cluster_shape()
        checks = [
            (
                "wall time (s)",
                projected.projected_wall_s,
                real.wall_seconds,
                max(projected.projected_wall_s, real.wall_seconds)
                / max(min(projected.projected_wall_s, real.wall_seconds), 1e-9),
                1.5,
            ),
            (
                "output bytes",
                projected.projected_output_bytes,
                real_bytes,
                max(projected.projected_output_bytes, real_bytes)
                / max(min(projected.projected_output_bytes, real_bytes), 1),
                1.5,
            ),
            ("kept fraction", projected.kept_fraction, round(kept, 4), abs(projected.kept_fraction - kept), 0.1),
        ]
        print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores; Ray cluster {shape.cpus:g} CPUs; "
              f"{args.images} images, stages {args.stages}; sample {projected.sampled} "
              f"({projected.sample_wall_s:.1f} s), real run {real.wall_seconds:.1f} s "
              f"(phases {real.phases})")
        print(f"{'':<16}{'projected':>14}{'real':>14}{'off by':>10}{'bound':>8}")
        ok = True
        for name, p, r, off, bound in checks:
            good = off <= bound
            ok &= good
            unit = "x" if bound > 1 else ""
            print(f"{name:<16}{p:>14,.4g}{r:>14,.4g}{off:>9.3g}{unit}{bound:>7g}{unit}  {'ok' if good else 'MISSED'}")
        print("bottleneck (projected):", projected.bottleneck_stage, "| real stage seconds:", real.stage_seconds)
        return 0 if ok else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
