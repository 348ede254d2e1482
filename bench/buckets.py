"""Pixels kept by aspect-ratio buckets vs a centre square crop, on ../shared/data/images.

    python bench/buckets.py

For each base resolution (512 SD 1.x, 768 SD 2, 1024 SDXL), every photo goes to its nearest
bucket (log aspect ratio), is resized to cover it and cropped; the share of the photo's pixels
inside the crop is averaged over the set, and compared with a centre square crop.
"""
from __future__ import annotations

import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from training.buckets import assign, bucket_table, kept_fraction, square_kept_fraction  # noqa: E402

IMAGES = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "images")


def sizes() -> list[tuple[int, int]]:
    out = []
    for d, _, names in os.walk(IMAGES):
        for n in sorted(names):
            try:
                with Image.open(os.path.join(d, n)) as img:
                    out.append(img.size)
            except Exception:  # noqa: BLE001 - not an image
                continue
    return out


def main() -> int:
    if not os.path.isdir(IMAGES):
        print(f"skipped: {IMAGES} not found")
        return 0
    wh = sizes()
    w, h = np.array([s[0] for s in wh]), np.array([s[1] for s in wh])
    aspects = w / h
    print(f"{len(wh)} photos; aspect ratios {aspects.min():.2f}..{aspects.max():.2f} (median {np.median(aspects):.2f})")
    square = float(np.mean([square_kept_fraction(a, b) for a, b in wh]))
    for base in (512, 768, 1024):
        table = bucket_table(base)
        idx = assign(w, h, table)
        kept = [kept_fraction(a, b, table[i]) for a, b, i in zip(w, h, idx, strict=True)]
        print(f"base {base:4d}: {len(table)} buckets, {len(set(idx.tolist()))} used; pixels kept {np.mean(kept):.4f} "
              f"(min {np.min(kept):.4f}) vs centre square {square:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
