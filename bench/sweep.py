"""`winnow sweep` on a million-row annotation table: seconds per phase.

    python bench/sweep.py [--rows 1000000]

A synthetic table (four scores, like a curated video or image run) is written to a temp folder;
the SVD-style sweep (drop 12.5/25/50 % per score, all 256 combinations) runs on it, first
without plots and sheets, then with plots. The baseline in the same run is pandas: the same
single-annotation cells by `DataFrame.quantile` and boolean indexing.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
sys.path.insert(0, ROOT)

COLS = ["clip_similarity", "aesthetic_score", "ocr_area_ratio", "motion_score"]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    from pipeline.commands import sweep

    rng = np.random.default_rng(0)
    n = args.rows
    work = tempfile.mkdtemp(prefix="winnow-bench-sweep-")
    path = os.path.join(work, "annotations.parquet")
    pq.write_table(pa.table({"key": [f"{i:09d}" for i in range(n)], "status": ["kept"] * n,
                             "partition": np.arange(n) // 1000,
                             "clip_similarity": rng.normal(0.28, 0.05, n), "aesthetic_score": rng.normal(5, 0.8, n),
                             "ocr_area_ratio": rng.beta(0.3, 6, n), "motion_score": rng.gamma(2, 3, n)}), path)
    filters = [{"column": c, "drop_fractions": [0.125, 0.25, 0.5]} for c in COLS]
    for plots in (False, True):
        spec = sweep.parse({"annotations": [path], "output": os.path.join(work, f"out{int(plots)}"),
                            "filters": filters, "plots": plots, "sheets": {"per_side": 0}})
        t = time.perf_counter()
        r = sweep.run(spec)
        wall = time.perf_counter() - t
        print(f"{n:,} rows, {len(r.cells)} cells, plots={plots}: {wall:.2f} s wall ("
              + ", ".join(f"{k} {v:.2f} s" for k, v in r.seconds.items()) + ")")
    import pandas as pd

    t = time.perf_counter()
    df = pd.read_parquet(path, columns=["key", *COLS])
    counts = []
    for c in COLS:
        good_low = c == "ocr_area_ratio"
        for p in (0.125, 0.25, 0.5):
            q = df[c].quantile(1 - p if good_low else p)
            counts.append(len(df.loc[df[c] <= q, "key"] if good_low else df.loc[df[c] >= q, "key"]))
    base = time.perf_counter() - t
    print(f"pandas baseline, the 12 single-annotation cells only (no combinations, no files): {base:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
