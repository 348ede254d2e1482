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


@dataclass(frozen=True)
class VideoBucket:
    """A video bucket: frame size, frames per clip, and its own per-rank batch size."""

    width: int
    height: int
    frames: int
    batch: int

    @property
    def aspect(self) -> float:
        return self.width / self.height

    @property
    def frame(self) -> Bucket:
        return Bucket(self.width, self.height)


def video_bucket_table(config: dict, step: int = 64) -> list[VideoBucket]:
    """Buckets from ``{"HxW": {frames: batch}}`` (Open-Sora's shape): each resolution gives a
    landscape (H x W), a portrait (W x H) and a square bucket of about the same area (side a
    multiple of ``step``), at every frame count listed, each with its batch size per rank."""
    out = set()
    for res, frames in config.items():
        try:
            h, w = (int(x) for x in str(res).lower().split("x"))
        except ValueError:
            raise ValueError(f"video bucket resolution {res!r}: write it as HEIGHTxWIDTH, e.g. 256x384") from None
        side = max(step, int(round(math.sqrt(h * w) / step)) * step)
        for f, batch in frames.items():
            if int(f) < 1 or int(batch) < 1:
                raise ValueError(f"video bucket {res}: frames {f} and batch {batch} must be at least 1")
            out |= {VideoBucket(max(h, w), min(h, w), int(f), int(batch)),
                    VideoBucket(min(h, w), max(h, w), int(f), int(batch)), VideoBucket(side, side, int(f), int(batch))}
    return sorted(out, key=lambda b: (b.width * b.height, b.frames, b.aspect))


def assign_clips(widths, heights, durations, fps, table: list[VideoBucket], target_fps: float, max_fps: float,
                 min_fps: float = 0.0) -> np.ndarray:
    """Each clip's bucket: the nearest aspect (log space; landscape, portrait or square), then the
    largest frame size the clip covers without upscaling (else the smallest), then the most frames
    it holds at ``target_fps`` (sampled up to ``max_fps`` when short), else the fewest. -1: no
    bucket of that aspect holds even the fewest frames (too_short), or the clip is slower than
    ``min_fps`` (fps_too_low); such clips are never drawn, and the plan counts them."""
    w, h = np.asarray(widths, np.float64), np.asarray(heights, np.float64)
    dur, rate = np.asarray(durations, np.float64), np.asarray(fps, np.float64)
    aspects = sorted({round(b.aspect, 6) for b in table})
    logs = np.log(np.asarray(aspects))
    nearest = np.asarray(aspects)[np.abs(np.log(w / h)[:, None] - logs[None, :]).argmin(axis=1)]
    out = np.full(len(w), -1, np.int64)
    for i in range(len(w)):
        if rate[i] < min_fps:
            continue
        same = [k for k, b in enumerate(table) if round(b.aspect, 6) == nearest[i]]
        covered = [k for k in same if table[k].width <= w[i] and table[k].height <= h[i]]
        area = max(table[k].width * table[k].height for k in covered) if covered else \
            min(table[k].width * table[k].height for k in same)
        sized = [k for k in same if table[k].width * table[k].height == area]
        # frames f fit when (f - 1) frames span at most the clip at the fastest allowed rate
        fastest = min(max_fps, rate[i])
        fits = [k for k in sized if (table[k].frames - 1) / fastest <= dur[i] - 1 / rate[i] + 1e-9]
        if fits:
            at_target = [
                k for k in fits if (table[k].frames - 1) / min(target_fps, rate[i]) <= dur[i] - 1 / rate[i] + 1e-9
            ]
            pool = at_target or fits
            out[i] = max(pool, key=lambda k: table[k].frames) if at_target else min(pool, key=lambda k: table[k].frames)
    return out


__all__ = [
    "Bucket",
    "Crop",
    "VideoBucket",
    "assign_clips",
    "video_bucket_table",
    "assign",
    "bucket_table",
    "kept_fraction",
    "plan_crop",
    "square_kept_fraction",
]
