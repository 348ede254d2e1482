"""Spliced test videos with known cuts, made from single shots of real footage: the evaluation
the cut detector is tuned and validated on (``bench/video_splice.py``).

A *shot* is a run of frames known to hold no cut: the frames between two ground-truth cuts of a
real video (a few frames of margin dropped each side), a whole video known to be one shot, or a
still photograph filmed by a virtual camera (a slow pan or zoom over it). Shots carry a
``group``: the footage they came from. Splits are by group, so no footage is in both halves.

Each generator class builds one kind of test video from shots and says exactly where its cuts are
(the index of the first frame of each new shot, in the output's frame numbering):

* with cuts: ``returns`` (A B A B ..., each 0.5-2 s: shot / reverse-shot), ``short`` (8-20 frames
  each), ``same_palette`` (consecutive shots of one source), ``mixed`` (random shots, 0.5-4 s),
  ``glitch_before_cut`` (corrupted frames 2-4 frames before a real cut), ``black_start`` (black
  frames, then a shot, then a cut);
* without (negatives): ``flash`` (1-2 frames washed toward white inside a shot), ``glitch``
  (1-2 frames with blocks of another picture), ``fade`` (out to black and in again), ``dissolve``
  (a cross-dissolve of 8-24 frames), ``pan`` (fast virtual camera motion with a shaking hand).

Every video gets its own output size and frame rate (from 160x90 to 1280x720, 15 to 60 fps):
shots are resampled by time and resized to cover the frame, so one threshold must hold across
sizes and rates. Everything is seeded.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from pipeline.contract.media import open_video

CLASSES_WITH_CUTS = ("returns", "short", "same_palette", "mixed", "glitch_before_cut", "black_start")
NEGATIVE_CLASSES = ("flash", "glitch", "fade", "dissolve", "pan")
CLASSES = CLASSES_WITH_CUTS + NEGATIVE_CLASSES
SIZES = ((160, 90), (320, 180), (480, 270), (640, 360), (1280, 720))
RATES = (15.0, 24.0, 25.0, 29.97, 30.0, 50.0, 60.0)
BLACK = 0                       # RGB black: H.264's limited range stores it as luma 16
DARK_RGB = 40.0                 # a source frame darker than this on average is a fade or a black card, not a shot


@dataclass
class Shot:
    frames: list                 # RGB uint8 arrays, one size per shot
    fps: float
    group: str                   # the footage it came from (the split is by group)
    name: str = ""

    @property
    def seconds(self) -> float:
        return len(self.frames) / self.fps


@dataclass
class Spliced:
    name: str
    klass: str
    frames: list
    fps: float
    cuts: list[int]
    groups: list[str] = field(default_factory=list)


# ---- shots ----

def shots_between_cuts(frames: list, fps: float, cuts: list[int], group: str, name: str = "", margin: int = 3,
                       min_len: int = 12, damaged: tuple = ()) -> list[Shot]:
    """The runs of ``frames`` between ground-truth ``cuts``, ``margin`` frames dropped each side;
    ``damaged`` (lo, hi) frame ranges (codec glitches) are cut out as well and never used."""
    bounds = sorted({0, len(frames), *cuts, *(x for r in damaged for x in r)})
    out = []
    for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        if any(lo <= a < hi for lo, hi in damaged):
            continue
        lo, hi = a + (margin if a else 0), b - (margin if b < len(frames) else 0)
        # fades to black and black title cards inside a run are transitions, not picture: keep the
        # lit parts (two black frames either side of a "cut" would show no cut at all)
        lit = [i for i in range(lo, hi) if float(np.asarray(frames[i]).mean()) >= DARK_RGB]
        for run in np.split(np.asarray(lit, int), np.flatnonzero(np.diff(lit) > 1) + 1) if lit else []:
            if len(run) >= min_len:
                out.append(Shot(frames[run[0]:run[-1] + 1], fps, group, f"{name}#{k}.{run[0]}"))
    return out


def decode_rgb(path: str, width: int = 320, max_frames: int = 900) -> tuple[list, float]:
    """(RGB frames ``width`` wide, in presentation order; fps) of a video file."""

    frames, times = [], []
    with open_video(path) as c:
        s = c.streams.video[0]
        for f in c.decode(s):
            h = max(2, round(width * f.height / f.width / 2) * 2)
            frames.append(f.to_ndarray(format="rgb24", width=width, height=h))
            times.append(float(f.time or 0.0))
            if len(frames) >= max_frames:
                break
    span = times[-1] - times[0] if len(times) > 1 else 0.0
    fps = (len(times) - 1) / span if span > 0 else 25.0
    return frames, fps


def still_shot(image: np.ndarray, seconds: float, fps: float, rng: np.random.Generator, group: str,
               name: str = "", width: int = 320) -> Shot:
    """A virtual camera over a still photograph: a slow pan and zoom (at most 3 % of the width per
    second), so the shot moves as real footage does but holds no cut."""
    from PIL import Image

    h, w = image.shape[:2]
    out_h = round(width * 9 / 16)
    n = max(2, int(round(seconds * fps)))
    crop_w = min(w, int(h * 16 / 9)) * rng.uniform(0.6, 0.85)
    crop_h = crop_w * 9 / 16
    x0, y0 = rng.uniform(0, w - crop_w), rng.uniform(0, h - crop_h)
    vx, vy = rng.uniform(-0.03, 0.03, 2) * crop_w / fps
    zoom = 1 + rng.uniform(-0.02, 0.02) / fps
    pil = Image.fromarray(image)
    frames = []
    for i in range(n):
        cw, ch = crop_w * zoom ** i, crop_h * zoom ** i
        x = float(np.clip(x0 + vx * i, 0, w - cw))
        y = float(np.clip(y0 + vy * i, 0, h - ch))
        frames.append(np.asarray(pil.resize((width, out_h), Image.BILINEAR, box=(x, y, x + cw, y + ch))))
    return Shot(frames, fps, group, name)


def split_groups(groups: list[str], salt: str = "winnow-splice") -> tuple[set[str], set[str]]:
    """(tuning, validation): every group in one half, by a hash of its name (stable across runs
    and machines); both halves non-empty when there are two groups or more."""
    order = sorted(set(groups), key=lambda g: hashlib.sha256(f"{salt}:{g}".encode()).hexdigest())
    half = max(1, len(order) // 2) if len(order) > 1 else len(order)
    return set(order[:half]), set(order[half:])


# ---- frame operations ----

def fit(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize to cover ``width`` x ``height`` and centre-crop."""
    from PIL import Image

    h, w = frame.shape[:2]
    scale = max(width / w, height / h)
    rw, rh = max(width, round(w * scale)), max(height, round(h * scale))
    img = Image.fromarray(frame).resize((rw, rh), Image.BILINEAR)
    left, top = (rw - width) // 2, (rh - height) // 2
    return np.ascontiguousarray(np.asarray(img)[top:top + height, left:left + width])


def resample(shot: Shot, fps: float, seconds: float | None = None, start_s: float = 0.0) -> list:
    """The shot's frames at ``fps`` by time (nearest earlier frame), from ``start_s`` for ``seconds``."""
    dur = shot.seconds - start_s if seconds is None else seconds
    n = max(1, int(round(dur * fps)))
    idx = np.minimum(((start_s + np.arange(n) / fps) * shot.fps).astype(int), len(shot.frames) - 1)
    return [shot.frames[i] for i in idx]


def flash(frame: np.ndarray, strength: float) -> np.ndarray:
    return (frame.astype(np.float32) * (1 - strength) + 255 * strength).astype(np.uint8)


def glitch(frame: np.ndarray, other: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A decoding glitch: blocks of ``other`` (another picture) and smeared rows over ``frame``."""
    out = frame.copy()
    h, w = out.shape[:2]
    block = max(8, w // 20)
    for _ in range(int(rng.integers(6, 14))):
        bw, bh = block * int(rng.integers(2, 8)), block * int(rng.integers(1, 4))
        x, y = int(rng.integers(0, max(1, w - bw))), int(rng.integers(0, max(1, h - bh)))
        out[y:y + bh, x:x + bw] = other[y:y + bh, x:x + bw]
    row = int(rng.integers(0, h))
    out[row:] = out[row:row + 1]                          # the bottom smeared from one row, as a lost slice
    return out


def blend(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    return (a.astype(np.float32) * (1 - t) + b.astype(np.float32) * t).astype(np.uint8)


# ---- the classes ----

class Builder:
    """Makes spliced videos of each class from a pool of shots (one half of the split)."""

    def __init__(self, shots: list[Shot], seed: int):
        if len(shots) < 2:
            raise ValueError("the splice generator needs at least two shots")
        self.shots, self.rng = shots, np.random.default_rng(seed)
        self.size = SIZES[0]

    def _pick(self, k: int, same_group: bool = False) -> list[Shot]:
        rng = self.rng
        if same_group:
            by = {}
            for s in self.shots:
                by.setdefault(s.group, []).append(s)
            groups = [g for g, v in by.items() if len(v) >= 2]
            if groups:
                pool = by[groups[int(rng.integers(len(groups)))]]
                return [pool[i] for i in rng.choice(len(pool), size=min(k, len(pool)), replace=False)]
        return [self.shots[i] for i in rng.choice(len(self.shots), size=k, replace=len(self.shots) < k)]

    def _segment(self, shot: Shot, fps: float, seconds: float) -> list:
        """``seconds`` of ``shot`` from a random start, at ``fps`` and the video's size."""
        seconds = min(seconds, shot.seconds)
        start = float(self.rng.uniform(0, max(0.0, shot.seconds - seconds)))
        cache: dict = {}
        out = []
        for f in resample(shot, fps, seconds, start):
            if id(f) not in cache:
                cache[id(f)] = fit(f, *self.size)
            out.append(cache[id(f)])
        return out

    def _sequence(self, shots: list[Shot], lengths_s: list[float], fps: float) -> tuple[list, list[int]]:
        frames, cuts = [], []
        for k, (s, secs) in enumerate(zip(shots, lengths_s, strict=True)):
            if k:
                cuts.append(len(frames))
            frames += self._segment(s, fps, secs)
        return frames, cuts

    def make(self, klass: str, index: int) -> Spliced:
        rng = self.rng
        width, height = SIZES[int(rng.integers(len(SIZES)))]
        self.size = (width, height)
        fps = float(RATES[int(rng.integers(len(RATES)))])
        frames, cuts, used = getattr(self, f"_{klass}")(fps)
        frames = [f if f.shape[:2] == (height, width) else fit(f, width, height) for f in frames]
        return Spliced(f"{klass}_{index:02d}_{width}x{height}_{fps:g}", klass, frames, fps, cuts,
                       sorted({s.group for s in used}))

    # -- with cuts --
    def _returns(self, fps):
        a, b = self._pick(2, same_group=True)
        n = int(self.rng.integers(5, 9))
        order = [a if k % 2 == 0 else b for k in range(n)]
        frames, cuts = self._sequence(order, list(self.rng.uniform(0.5, 2.0, n)), fps)
        return frames, cuts, [a, b]

    def _short(self, fps):
        shots = self._pick(int(self.rng.integers(5, 8)))
        lengths = [int(self.rng.integers(8, 21)) / fps for _ in shots]
        frames, cuts = self._sequence(shots, lengths, fps)
        return frames, cuts, shots

    def _same_palette(self, fps):
        shots = self._pick(int(self.rng.integers(3, 6)), same_group=True)
        frames, cuts = self._sequence(shots, list(self.rng.uniform(0.7, 2.5, len(shots))), fps)
        return frames, cuts, shots

    def _mixed(self, fps):
        shots = self._pick(int(self.rng.integers(4, 7)))
        frames, cuts = self._sequence(shots, list(self.rng.uniform(0.5, 4.0, len(shots))), fps)
        return frames, cuts, shots

    def _glitch_before_cut(self, fps):
        shots = self._pick(3)
        frames, cuts = self._sequence(shots, list(self.rng.uniform(1.5, 3.0, 3)), fps)
        for c in cuts:
            at = c - int(self.rng.integers(2, 5))
            for k in range(int(self.rng.integers(1, 3))):
                frames[at + k] = glitch(frames[at + k], frames[min(len(frames) - 1, c + 3)], self.rng)
        return frames, cuts, shots

    def _black_start(self, fps):
        shots = self._pick(2)
        frames, cuts = self._sequence(shots, list(self.rng.uniform(1.5, 3.0, 2)), fps)
        k = int(self.rng.integers(1, 5))
        black = np.full_like(frames[0], BLACK)
        return [black] * k + frames, [c + k for c in cuts], shots

    # -- negatives --
    def _one_shot(self, fps, seconds):
        s = self._pick(1)[0]
        return self._segment(s, fps, seconds), s

    def _flash(self, fps):
        frames, s = self._one_shot(fps, float(self.rng.uniform(3.0, 5.0)))
        for _ in range(int(self.rng.integers(1, 3))):
            at, n = int(self.rng.integers(3, max(4, len(frames) - 4))), int(self.rng.integers(1, 3))
            strength = float(self.rng.uniform(0.6, 0.9))
            for k in range(n):
                if at + k < len(frames):
                    frames[at + k] = flash(frames[at + k], strength)
        return frames, [], [s]

    def _glitch(self, fps):
        s, other = self._pick(2)                               # the glitch shows another picture
        frames = self._segment(s, fps, float(self.rng.uniform(3.0, 5.0)))
        at, n = int(self.rng.integers(3, max(4, len(frames) - 4))), int(self.rng.integers(1, 3))
        for k in range(n):
            if at + k < len(frames):
                frames[at + k] = glitch(frames[at + k], fit(other.frames[0], *self.size), self.rng)
        return frames, [], [s, other]

    def _fade(self, fps):
        a, b = self._pick(2)
        fa, fb = self._segment(a, fps, 1.5), self._segment(b, fps, 1.5)
        out_n, in_n, hold = (int(self.rng.integers(8, 21)), int(self.rng.integers(8, 21)), int(self.rng.integers(0, 6)))
        black = np.full_like(fa[0], BLACK)
        frames = fa[:-out_n] + [blend(f, black, (k + 1) / out_n) for k, f in enumerate(fa[-out_n:])] + [black] * hold
        frames += [blend(black, f, (k + 1) / in_n) for k, f in enumerate(fb[:in_n])] + fb[in_n:]
        return frames, [], [a, b]

    def _dissolve(self, fps):
        a, b = self._pick(2)
        fa, fb = self._segment(a, fps, 1.5), self._segment(b, fps, 1.5)
        n = min(int(self.rng.integers(8, 25)), len(fa), len(fb))
        mid = [blend(x, y, (k + 1) / (n + 1)) for k, (x, y) in enumerate(zip(fa[-n:], fb[:n], strict=True))]
        return fa[:-n] + mid + fb[n:], [], [a, b]

    def _pan(self, fps):
        """A fast pan (4-12 % of the view per frame at 25 fps) over a frame of a shot, with a
        shaking hand (a few % jitter each frame)."""
        s = self._pick(1)[0]
        src = s.frames[len(s.frames) // 2]
        h, w = src.shape[:2]
        n = int(round(float(self.rng.uniform(2.0, 3.5)) * fps))
        cw, ch = w * 0.5, h * 0.5
        speed = float(self.rng.uniform(0.02, 0.06)) * w * 25 / fps      # 4-12 % of the view per frame at 25 fps
        direction = float(self.rng.choice([-1.0, 1.0]))
        from PIL import Image

        pil = Image.fromarray(src)
        frames = []
        for i in range(n):
            travel = (speed * i) % (2 * (w - cw))               # sweeps back and forth across the picture
            x = travel if travel <= w - cw else 2 * (w - cw) - travel
            x = x if direction > 0 else (w - cw) - x
            jx, jy = self.rng.normal(0, 0.02 * w), self.rng.normal(0, 0.02 * h)
            x0 = float(np.clip(x + jx, 0, w - cw))
            y0 = float(np.clip((h - ch) / 2 + jy, 0, h - ch))
            frames.append(np.asarray(pil.resize((w, h), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))))
        return frames, [], [s]


def build_set(shots: list[Shot], per_class: int, seed: int, classes=CLASSES) -> list[Spliced]:
    """``per_class`` videos of every class from ``shots``."""
    builder = Builder(shots, seed)
    return [builder.make(k, i) for k in classes for i in range(per_class)]


__all__ = ["BLACK", "Builder", "CLASSES", "CLASSES_WITH_CUTS", "NEGATIVE_CLASSES", "RATES", "SIZES", "Shot", "Spliced",
           "blend", "build_set", "decode_rgb", "fit", "flash", "glitch", "resample", "shots_between_cuts",
           "split_groups", "still_shot"]
