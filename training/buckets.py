"""Aspect-ratio buckets (NovelAI's idea, as SDXL used it; Podell et al., 2023, app. I).

A bucket table for a base resolution holds sizes whose sides are multiples of ``step`` and whose
pixel count is as close to ``base**2`` as the grid allows without exceeding it, for aspect
ratios in ``[1 / max_aspect, max_aspect]`` (SDXL's table runs from 512x2048 to 2048x512 at base
1024). An image goes to the bucket nearest its aspect ratio in log space, is resized to cover
the bucket and cropped; the crop's top-left and the original size are kept for SDXL's
micro-conditioning.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Bucket:
    width: int
    height: int

    @property
    def aspect(self) -> float:
        return self.width / self.height


def bucket_table(base: int, step: int = 64, max_aspect: float = 4.0) -> list[Bucket]:
    """Buckets for ``base`` (512 for SD 1.x, 768 for SD 2 v, 1024 for SDXL), widest last."""
    if base % step:
        raise ValueError(f"base {base} is not a multiple of step {step}")
    area = base * base
    out: set[tuple[int, int]] = set()
    w = base
    while True:
        h = (area // w) // step * step
        if h < step or w / h > max_aspect + 1e-9:
            break
        out.add((w, h))
        out.add((h, w))
        w += step
    return sorted((Bucket(w, h) for w, h in out), key=lambda b: b.aspect)


def assign(widths: np.ndarray, heights: np.ndarray, table: list[Bucket]) -> np.ndarray:
    """Index of the nearest bucket (log aspect ratio) for every image."""
    logs = np.log(np.asarray([b.aspect for b in table]))
    img = np.log(np.asarray(widths, np.float64) / np.asarray(heights, np.float64))
    return np.abs(img[:, None] - logs[None, :]).argmin(axis=1)


@dataclass(frozen=True)
class Crop:
    resize_w: int          # the image is resized to this size (covering the bucket) ...
    resize_h: int
    left: int              # ... then cropped at (left, top) to the bucket's size
    top: int
    original_w: int
    original_h: int


def plan_crop(width: int, height: int, bucket: Bucket, rng: np.random.Generator | None = None) -> Crop:
    """Resize to cover ``bucket`` (aspect kept), then a random crop (``rng``) or the centre one."""
    scale = max(bucket.width / width, bucket.height / height)
    rw, rh = max(bucket.width, math.ceil(width * scale - 1e-6)), max(bucket.height, math.ceil(height * scale - 1e-6))
    dx, dy = rw - bucket.width, rh - bucket.height
    if rng is None:
        left, top = dx // 2, dy // 2
    else:
        left, top = int(rng.integers(0, dx + 1)), int(rng.integers(0, dy + 1))
    return Crop(rw, rh, left, top, width, height)


def kept_fraction(width: int, height: int, bucket: Bucket) -> float:
    """Share of the image's pixels inside the bucket crop."""
    c = plan_crop(width, height, bucket)
    return (bucket.width * bucket.height) / (c.resize_w * c.resize_h)


def square_kept_fraction(width: int, height: int) -> float:
    """The same for a centre square crop (what a trainer without buckets keeps)."""
    return min(width, height) ** 2 / (width * height)


__all__ = ["Bucket", "Crop", "assign", "bucket_table", "kept_fraction", "plan_crop", "square_kept_fraction"]
