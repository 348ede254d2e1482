"""Contact sheets for a sweep: per annotation and cut, the samples just below (dropped) and just
above (kept) the threshold, as thumbnails read from the run's shards. A clip shows its first,
middle and last frame. Reviewers judge what a threshold removes by looking, as the SVD authors
did with human preference studies.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from pipeline.contract import layout, media, storage
from pipeline.contract import tar as tars
from pipeline.contract.layout import atomic_path

LABEL_H = 14


class ShardImages:
    """Thumbnails by key from the shards of runs (run folders, or annotation files inside them)."""

    def __init__(self, runs: list[str], thumb: int):
        self.dirs = [storage.join(p if storage.isdir(p) else storage.parent(storage.join(p)), layout.SHARDS_DIR)
                     for p in runs]
        self.thumb = thumb
        self._tars: dict[str, tuple[object, dict]] = {}

    def _member(self, run: int, partition: int, key: str) -> tuple[bytes, str] | None:
        path = storage.join(self.dirs[run], f"{partition:05d}.tar")
        if path not in self._tars:
            try:
                fh = storage.open_read(path)
            except FileNotFoundError:
                return None
            samples = [s for s in tars.group(list(tars.scan(fh))) if isinstance(s, tars.Sample) and s.media]
            self._tars[path] = (fh, {s.key: s for s in samples})
        fh, samples = self._tars[path]
        sample = samples.get(key)
        if sample is None:
            return None
        fh.seek(sample.media.data)
        return fh.read(sample.media.size), sample.media_ext

    def thumbnail(self, run: int, partition: int, key: str) -> Image.Image:
        found = self._member(run, partition, key)
        t = self.thumb
        if found is None:
            return Image.new("RGB", (t, t), (60, 60, 60))
        data, ext = found
        if ext == "mp4":
            frames = clip_frames(data)
            w3 = t // 3
            tiles = [f.resize((w3, max(1, min(t, int(w3 * f.height / max(1, f.width)))))) for f in frames]
            out = Image.new("RGB", (t, t), (20, 20, 20))
            for i, tile in enumerate(tiles):
                out.paste(tile, (i * w3, (t - tile.height) // 2))
            return out
        with media.open_image(data, media.PREVIEW, draft=(2 * t, 2 * t)) as im:
            im = im.convert("RGB")
            im.thumbnail((t, t))
        out = Image.new("RGB", (t, t), (20, 20, 20))
        out.paste(im, ((t - im.width) // 2, (t - im.height) // 2))
        return out

    def close(self) -> None:
        for fh, _ in self._tars.values():
            fh.close()


def clip_frames(data: bytes) -> list[Image.Image]:
    """First, middle and last frame of an encoded clip."""
    try:
        frames = media.video_frames(data, (0.0, 0.5, 1.0))
    except media.MediaError:       # refused from its header (too large): a blank tile
        frames = []
    if not frames:
        return [Image.new("RGB", (16, 16))]
    return frames


def nearest(values: np.ndarray, threshold: float, keep: str, per_side: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices just below (dropped) and just above (kept) ``threshold``, nearest first."""
    ok = np.flatnonzero(~np.isnan(values))
    kept = values[ok] >= threshold if keep == "high" else values[ok] <= threshold
    dist = np.abs(values[ok] - threshold)
    dropped_rows, kept_rows = ok[~kept], ok[kept]
    return (dropped_rows[np.argsort(dist[~kept], kind="stable")[:per_side]],
            kept_rows[np.argsort(dist[kept], kind="stable")[:per_side]])


def sheet(images: ShardImages, refs, values: np.ndarray, level, per_side: int) -> Image.Image:
    """``refs(rows)``: the (run, partition, key) of the given rows."""
    t = images.thumb
    below, above = nearest(values, level.threshold, level.keep, per_side)
    width = max(1, per_side) * t
    out = Image.new("RGB", (width, 2 * (t + LABEL_H) + 2 * LABEL_H), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    for r, (label, rows) in enumerate((("dropped (just past the cut)", below), ("kept (just inside the cut)", above))):
        y = r * (t + 2 * LABEL_H)
        draw.text((4, y), f"{label}: {level.name}", fill=(0, 0, 0))
        for i, (row, (run, part, key)) in enumerate(zip(rows, refs(rows), strict=True)):
            out.paste(images.thumbnail(int(run), int(part), key), (i * t, y + LABEL_H))
            draw.text((i * t + 3, y + LABEL_H + t), f"{values[row]:.4g}", fill=(0, 0, 0))
    return out


def contact_sheets(refs, annotation_files: list[str], columns: dict[str, np.ndarray], levels: dict,
                   per_side: int, thumb: int, out: str) -> list[str]:
    """One sheet per annotation and level: ``columns`` holds each swept column's values (float, NaN
    for none), ``levels`` its cuts, ``refs(rows)`` the (run, partition, key) of rows; images come
    from the shards beside ``annotation_files``."""
    folder = storage.join(out, "sheets")
    storage.makedirs(folder)
    images = ShardImages(annotation_files, thumb)
    paths = []
    try:
        for col, lvls in levels.items():
            v = columns[col]
            for j, lv in enumerate(lvls):
                path = storage.join(folder, f"{col}_{j}.jpg")
                with atomic_path(path) as tmp:
                    sheet(images, refs, v, lv, per_side).save(tmp, format="JPEG", quality=88)
                paths.append(path)
    finally:
        images.close()
    return paths


__all__ = ["ShardImages", "clip_frames", "contact_sheets", "nearest", "sheet"]
