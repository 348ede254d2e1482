"""Motion score: dense optical flow between frames sampled at a low rate (SVD's LVD filter).

Frames are taken every 1/``rate`` seconds (by timestamp, so variable frame rate is handled),
as grey images ``width`` pixels wide; OpenCV's DIS flow (Kroeger et al., 2016) runs between
consecutive samples. The unit is resolution- and rate-free: **mean flow magnitude in percent of
the frame width per second** (a pan across the whole width in 4 s scores 25). Per-pair values
are kept for later motion-bucket conditioning.

Each flow field is split in two (``decompose``): ``camera_motion``, the affine field fitted to it
(a pan, tilt, zoom or roll moves every pixel by such a field), and ``subject_motion``, the
residual (what moves in the scene). ``motion_score`` stays the mean of the whole field.

In a video run the clips stage keeps the grey samples from the upright frames it encodes
(``FrameSampler``, ``motion_frames`` in flight), so this stage decodes nothing: bench/video_motion.py
measures 280-310x real time on 720p with them against 45x decoding the clip again.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Literal

import numpy as np

from pipeline.contract.config import ConfigError, option
from pipeline.contract.schema import (
    CAMERA_MOTION,
    CAMERA_MOVE,
    CAMERA_PAN_X,
    CAMERA_PAN_Y,
    CAMERA_ROLL,
    CAMERA_ZOOM,
    IMAGE,
    IMAGE_EXT,
    MOTION_FRAMES,
    MOTION_PAIRS,
    MOTION_SCORE,
    SUBJECT_MOTION,
)
from pipeline.contract.stage import Stage, active, column, reject


@dataclass
class MotionConfig:
    rate: float = option(2.0, "frames per second sampled for flow (SVD: 2)", min=0.1)
    width: int = option(160, "width of the grey frames the flow runs on", min=32, max=1024)
    preset: str = option("fast", "DIS preset: ultrafast, fast or medium")
    method: Literal["dis", "farneback"] = option("dis", "optical flow: dis (Kroeger et al., 2016) or farneback "
                                                 "(Farneback, 2003; what the SVD paper used at 2 fps)")
    camera_refine: int = option(2, "registration passes that refine the camera's affine fit (camera_pan_x/_y, "
                                "camera_zoom, camera_roll) on the frame pair aligned by the fit so far, from the "
                                "flow's fit and from phase correlation's shift; one pass of dense flow reads a zoom "
                                "at 55-85 % of its size and loses fast pans over fine repeating texture (0: one pass)",
                                min=0, max=5)
    fast_decode: bool = option(True, "where this stage decodes the clip itself (the clips stage hands the first "
                               "motion stage its frames; a second one with another rate or width decodes): decode "
                               "only reference frames, without deblocking "
                               "(the 2 fps samples take the nearest decoded frame and its timestamp): 1.3-1.8x "
                               "faster, the bench's thresholds hold")


_PRESETS = {"ultrafast": 0, "fast": 1, "medium": 2}


def read_for_motion(source, config: MotionConfig | None = None):
    """The small frames ``clip_motion`` reads, decoded as ``config`` says."""
    from video.frames import read_small

    cfg = config or MotionConfig()
    return read_small(source, width=cfg.width, deblock=not cfg.fast_decode, reference_only=cfg.fast_decode)


class FrameSampler:
    """Online ``sample_indices``: fed a clip's frames in time order, keeps the grey frame nearest
    to each of t0, t0 + 1/rate, ... (``width`` pixels wide, sampled from the Y plane like
    ``video.frames.read_small``), so the clips stage hands the motion stage its 2-fps frames from
    the frames it is encoding anyway instead of the motion stage decoding the clip again."""

    def __init__(self, rate: float, width: int):
        self.step, self.width = 1.0 / rate, width
        self.target: float | None = None
        self.prev: tuple[float, np.ndarray] | None = None
        self.times: list[float] = []
        self.grey: list[np.ndarray] = []
        self.grid = None

    def _take(self, t: float, grey: np.ndarray) -> None:
        if not self.times or self.times[-1] != t:
            self.times.append(t)
            self.grey.append(grey)

    def add(self, t: float, luma: np.ndarray) -> None:
        """One frame: its time and its full-size Y plane (h, w; row padding cut off)."""
        if self.grid is None:
            h, w = luma.shape
            height = max(1, round(self.width * h / w))
            self.grid = np.ix_(np.linspace(0, h - 1, height).astype(int), np.linspace(0, w - 1, self.width).astype(int))
        grey = luma[self.grid]
        if self.target is None:
            self.target = t
        while self.target is not None and t >= self.target - 1e-9:
            # the nearer of the previous frame and this one; a tie goes to this one (as sample_indices)
            if self.prev is not None and abs(self.prev[0] - self.target) < abs(t - self.target):
                self._take(*self.prev)
            else:
                self._take(t, grey)
            self.target += self.step
        self.prev = (t, grey)

    def packed(self) -> bytes | None:
        return pack_frames(np.asarray(self.times), np.stack(self.grey), 1.0 / self.step) if self.times else None


_MAGIC = b"WMF1"
_HEAD = struct.Struct("<4sIIId")


def pack_frames(times: np.ndarray, grey: np.ndarray, rate: float) -> bytes:
    """Sampled frames as bytes (no pickle): header, float64 times, uint8 pixels."""
    n, h, w = grey.shape
    return (_HEAD.pack(_MAGIC, n, h, w, float(rate)) + np.asarray(times, "<f8").tobytes()
            + np.ascontiguousarray(grey, np.uint8).tobytes())


def unpack_frames(data: bytes) -> tuple[np.ndarray, np.ndarray, float]:
    """(times, grey (n, h, w), rate) from ``pack_frames``' bytes; ValueError when they do not add up."""
    if len(data) < _HEAD.size:
        raise ValueError("motion frames: truncated header")
    magic, n, h, w, rate = _HEAD.unpack_from(data)
    if magic != _MAGIC or len(data) != _HEAD.size + 8 * n + n * h * w:
        raise ValueError("motion frames: not winnow's packed frames, or truncated")
    times = np.frombuffer(data, "<f8", n, _HEAD.size).astype(np.float64)
    grey = np.frombuffer(data, np.uint8, n * h * w, _HEAD.size + 8 * n).reshape(n, h, w)
    return times, grey, rate


def sample_indices(times: np.ndarray, rate: float) -> np.ndarray:
    """Indices of the frames nearest to t0, t0 + 1/rate, ... (each frame at most once)."""
    if len(times) == 0:
        return np.zeros(0, dtype=np.int64)
    targets = np.arange(times[0], times[-1] + 1e-9, 1.0 / rate)
    idx = np.searchsorted(times, targets)
    idx = np.clip(idx, 0, len(times) - 1)
    prev = np.clip(idx - 1, 0, len(times) - 1)
    idx = np.where(np.abs(times[prev] - targets) < np.abs(times[idx] - targets), prev, idx)
    return np.unique(idx)


def affine_fit(flow: np.ndarray, keep: float = 0.7, step: int | None = None) -> np.ndarray:
    """The affine field (3, 2) fitted to a flow field (h, w, 2) in pixels: flow = [x/w - 0.5,
    y/h - 0.5, 1] @ coef, by least squares refitted twice on the ``keep`` share of points it
    explains best, so subjects moving over the background do not drag it."""
    h, w = flow.shape[:2]
    step = step or max(1, min(h, w) // 24)
    ys, xs = np.mgrid[0:h:step, 0:w:step]
    basis = np.stack([xs.ravel() / w - 0.5, ys.ravel() / h - 0.5, np.ones(xs.size)], axis=1)
    target = flow[::step, ::step].reshape(-1, 2).astype(np.float64)
    inliers = np.ones(len(target), bool)
    for _ in range(3):
        coef = np.linalg.lstsq(basis[inliers], target[inliers], rcond=None)[0]
        err = np.linalg.norm(target - basis @ coef, axis=1)
        inliers = err <= np.quantile(err, keep)
        if inliers.sum() < 6:
            break
    return coef


def camera_of(coef: np.ndarray, width: int, height: int) -> tuple[float, float, float, float]:
    """The camera's move in one affine field, named as the camera's (see ``CameraMove``): (pan_x,
    pan_y in % of the frame width, zoom in % of scale (log), roll in degrees), per frame pair.

    The field's translation at the frame's centre is the pan: content moving left is the camera
    turning right (pan_x > 0), content moving down is the camera tilting up (pan_y > 0). Its
    linear part in pixels per pixel, J, splits into half its trace (the picture's growth: zoom
    in > 0) and half its curl (the picture turning clockwise on screen, y pointing down, is the
    camera rolling anticlockwise: roll < 0)."""
    jxx, jxy = coef[0, 0] / width, coef[1, 0] / height
    jyx, jyy = coef[0, 1] / width, coef[1, 1] / height
    growth = 1.0 + (jxx + jyy) / 2
    zoom = 100.0 * float(np.log(growth)) if growth > 0 else float("nan")
    return (-100.0 * float(coef[2, 0]) / width, 100.0 * float(coef[2, 1]) / width, zoom,
            -float(np.degrees((jyx - jxy) / 2)))


def _aligned(grey: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """``grey`` (the later frame) sampled where the affine field ``coef`` says each pixel of the
    earlier one went: where the field is right, the result matches the earlier frame."""
    import cv2

    h, w = grey.shape
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
    fx = coef[0, 0] * (gx / w - 0.5) + coef[1, 0] * (gy / h - 0.5) + coef[2, 0]
    fy = coef[0, 1] * (gx / w - 0.5) + coef[1, 1] * (gy / h - 0.5) + coef[2, 1]
    return cv2.remap(grey, (gx + fx).astype(np.float32), (gy + fy).astype(np.float32), cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REPLICATE)


def register(a: np.ndarray, b: np.ndarray, coef: np.ndarray, flow, passes: int) -> np.ndarray:
    """The affine field that carries grey frame ``a`` onto ``b``, refined by registration (Bergen
    et al. 1992: align ``b`` by the field so far, fit the flow that is left, add it; ``passes``
    times) from two starts: the flow's own fit ``coef``, and the translation phase correlation
    finds over the whole frame (Kuglin & Hines 1975), which dense flow misses on fast pans over
    fine repeating texture (brick, grass, text). The result that leaves the smaller photometric
    error in the frame's middle wins."""
    import cv2

    h, w = a.shape
    shift = np.zeros((3, 2))
    window = cv2.createHanningWindow((w, h), cv2.CV_32F)
    shift[2] = cv2.phaseCorrelate(a.astype(np.float32), b.astype(np.float32), window)[0]
    best, best_err = coef, np.inf
    middle = (slice(h // 8, h - h // 8), slice(w // 8, w - w // 8))
    for start in (coef, shift):
        c = start
        for _ in range(passes):
            c = c + affine_fit(flow(a, _aligned(b, c)))
        err = float(np.abs(a[middle].astype(np.float32) - _aligned(b, c)[middle].astype(np.float32)).mean())
        if err < best_err:
            best, best_err = c, err
    return best


def decompose(flow: np.ndarray, keep: float = 0.7, top: float = 0.1, coef: np.ndarray | None = None
              ) -> tuple[float, float, float]:
    """(total, camera, subject) flow magnitudes of one field (h, w, 2), in pixels.

    total: the mean magnitude over the frame (``motion_score``'s measure). camera: the mean
    magnitude of the affine field (pan, tilt, zoom, roll, shear: six parameters, ``affine_fit``).
    subject: the residual's mean over the ``top`` share of the frame where it is largest -- how
    fast the moving part of the scene moves, whether it fills the frame or a tenth of it (a frame
    mean would dilute a small subject into the noise of a still one)."""
    h, w = flow.shape[:2]
    coef = affine_fit(flow, keep) if coef is None else coef
    gy, gx = np.mgrid[0:h, 0:w]
    camera = (np.stack([gx / w - 0.5, gy / h - 0.5, np.ones((h, w))], axis=-1) @ coef).astype(np.float32)
    residual = np.linalg.norm(flow - camera, axis=-1).ravel()
    k = max(1, int(round(top * residual.size)))
    return (float(np.linalg.norm(flow, axis=-1).mean()), float(np.linalg.norm(camera, axis=-1).mean()),
            float(np.partition(residual, residual.size - k)[-k:].mean()))


def flow_parts(grey: np.ndarray, times: np.ndarray, config: MotionConfig | None = None) -> np.ndarray:
    """Per consecutive pair of ``grey`` frames (n, h, w uint8): (total, camera, subject) mean
    flow in % of the frame width per second, then the camera's pan_x, pan_y (% of the width per
    second), zoom (% of scale per second) and roll (degrees per second): shape (pairs, 7)."""
    import cv2

    cfg = config or MotionConfig()
    if cfg.method == "farneback":          # OpenCV's defaults of its samples: 3 levels, window 15
        def flow(a, b):
            return cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)
    else:
        dis = cv2.DISOpticalFlow_create(_PRESETS.get(cfg.preset, 1))

        def flow(a, b):
            return dis.calc(a, b, None)
    out = []
    for a in range(1, len(grey)):
        dt = float(times[a] - times[a - 1])
        if dt <= 0:
            continue
        field = flow(grey[a - 1], grey[a])
        coef = affine_fit(field)
        parts = decompose(field, coef=coef)
        if cfg.camera_refine:
            coef = register(grey[a - 1], grey[a], coef, flow, cfg.camera_refine)
        cam = camera_of(coef, grey.shape[2], grey.shape[1])
        out.append([100.0 * p / grey.shape[2] / dt for p in parts] + [c / dt for c in cam])
    return np.asarray(out, dtype=np.float64).reshape(-1, 7)


@dataclass
class Motion:
    score: float | None                  # mean total flow (motion_score)
    camera: float | None                 # mean camera (global affine) part
    subject: float | None                # mean subject (residual) part
    pairs: list[float]                   # total per sampled pair
    pan_x: float | None = None           # the camera's mean move (``camera_of``), per second
    pan_y: float | None = None
    zoom: float | None = None
    roll: float | None = None


MOVES = ("static", "pan_left", "pan_right", "tilt_up", "tilt_down", "zoom_in", "zoom_out", "complex")


@dataclass
class CameraMove:
    """Names a clip's camera move from its mean pan, tilt, zoom and roll. Each is turned into the
    speed it gives the frame's left and right edges, in % of the frame width per second (a pan
    its own; a zoom of z %/s moves the edges z/2; a roll of r deg/s moves them 50 r pi / 180), so
    the four compare in one unit. A clip is ``static`` when its camera field's mean magnitude
    (``camera_motion``, which also counts shake that averages out) is under ``static_below``;
    otherwise the largest of the four names the move when it is at least ``static_below`` and
    ``dominance`` times every other; anything else (a diagonal, a pan and a zoom together, a roll,
    a shake with no net move) is ``complex``."""

    static_below: float = 1.3     # bench/video_motion.py: the camera_motion that separates fixed cameras
    dominance: float = 2.0        # one component twice any other

    def edges(self, m: Motion) -> np.ndarray:
        return np.abs([m.pan_x, m.pan_y, m.zoom / 2, 50.0 * np.radians(m.roll)])

    def __call__(self, m: Motion) -> str | None:
        if m.camera is None or m.pan_x is None or not np.isfinite([m.pan_x, m.pan_y, m.zoom, m.roll]).all():
            return None
        speed = self.edges(m)
        if m.camera < self.static_below and speed.max() < self.static_below:
            return "static"
        top = int(np.argmax(speed))
        rest = np.delete(speed, top)
        if top == 3 or speed[top] < self.static_below or speed[top] < self.dominance * rest.max():
            return "complex"
        value = (m.pan_x, m.pan_y, m.zoom)[top]
        return (("pan_left", "pan_right"), ("tilt_down", "tilt_up"), ("zoom_out", "zoom_in"))[top][int(value > 0)]


def clip_motion(times: np.ndarray, luma: np.ndarray, config: MotionConfig | None = None,
                sampled: bool = False) -> Motion:
    """The motion of one clip from its frames' times and luma planes (n, h, w); ``sampled``: the
    frames are already the ones at ``config.rate`` (``FrameSampler``'s)."""
    cfg = config or MotionConfig()
    idx = np.arange(len(times)) if sampled else sample_indices(np.asarray(times, dtype=np.float64), cfg.rate)
    if len(idx) < 2:
        return Motion(None, None, None, [])
    parts = flow_parts(np.ascontiguousarray(luma[idx]), np.asarray(times)[idx], cfg)
    if not len(parts):
        return Motion(None, None, None, [])
    mean = parts.mean(axis=0)
    return Motion(*(round(float(v), 4) for v in mean[:3]), [round(float(p), 4) for p in parts[:, 0]],
                  *(round(float(v), 4) for v in mean[3:]))


def motion_score(
    times: np.ndarray, luma: np.ndarray, config: MotionConfig | None = None
) -> tuple[float | None, list[float]]:
    """(mean, per-pair) motion of one clip from its frames' times and luma planes (n, h, w)."""
    m = clip_motion(times, luma, config)
    return m.score, m.pairs


@dataclass
class MotionStageConfig(MotionConfig):
    min_score: float | None = option(None, "reject clips whose motion_score is below this (static clips; "
                                     "unit: % of frame width per second)", min=0)
    max_score: float | None = option(None, "reject clips above this (shaky or flickering footage)", min=0)
    min_camera: float | None = option(None, "camera_motion below this is a fixed camera (bench/video_motion.py: 1.3 "
                                      "separates fixed from moving cameras at every size and rate measured); such a "
                                      "clip is rejected as static unless its subject_motion reaches min_subject", min=0)
    min_subject: float | None = option(None, "with min_camera: how fast something must move before a fixed camera "
                                       "for the clip to stay (unset: fixed-camera clips are all rejected)", min=0)
    camera_static_below: float = option(1.3, "camera_move is static below this camera_motion (% of width per "
                                        "second; bench/video_motion.py's fixed-camera threshold)", min=0)
    camera_dominance: float = option(2.0, "camera_move names a pan, tilt or zoom when its speed at the frame's "
                                     "edges is at least this many times every other component's; else complex",
                                     min=1.0)


class MotionScore(Stage):
    """The ``motion`` stage: decodes each clip small and adds ``motion_score``, ``camera_motion``,
    ``subject_motion``, ``motion_pairs``, the camera's ``camera_pan_x``, ``camera_pan_y``,
    ``camera_zoom``, ``camera_roll`` and its named ``camera_move``."""

    name = "motion"
    Config = MotionStageConfig
    after = ("clips",)
    batch_size = 8

    @classmethod
    def validate(cls, config: MotionStageConfig, key: str, earlier) -> None:
        super().validate(config, key, earlier)
        if config.min_subject is not None and config.min_camera is None:
            raise ConfigError(f"{key}.min_subject: only applies to fixed-camera clips; set min_camera too "
                              f"(e.g. 1.3) or drop min_subject")
        # the clips stage keeps this stage's 2-fps frames from the frames it encodes: no second decode
        clips = [c for n, c in earlier if n == "clips"]
        if clips and getattr(clips[-1], "motion_sample", False) is None:
            clips[-1].motion_sample = [config.rate, config.width]

    def frames(self, packed: bytes | None, data: bytes):
        """(times, grey frames, already sampled?) of one clip: the clips stage's frames when it
        kept them at this stage's rate and width, else the clip decoded small."""
        import io

        cfg = self.config
        if packed is not None:
            times, grey, rate = unpack_frames(packed)
            if abs(rate - cfg.rate) < 1e-9 and grey.shape[2] == cfg.width:
                return times, grey, True
        small = read_for_motion(io.BytesIO(data), cfg)
        return small.times, small.yuv[..., 0], False

    def __call__(self, batch):
        import json

        handed = batch.pop(MOTION_FRAMES, None)
        keep = active(batch)
        scores, pairs = column(batch, MOTION_SCORE), column(batch, MOTION_PAIRS)
        camera, subject = column(batch, CAMERA_MOTION), column(batch, SUBJECT_MOTION)
        params = [column(batch, c) for c in (CAMERA_PAN_X, CAMERA_PAN_Y, CAMERA_ZOOM, CAMERA_ROLL)]
        moves = column(batch, CAMERA_MOVE)
        cfg = self.config
        name = CameraMove(cfg.camera_static_below, cfg.camera_dominance)
        for i in np.flatnonzero(keep):
            if batch.get(IMAGE_EXT) is None or batch[IMAGE_EXT][i] != "mp4" or batch[IMAGE][i] is None:
                continue
            try:
                times, grey, sampled = self.frames(handed[i] if handed is not None else None, batch[IMAGE][i])
                m = clip_motion(times, grey, cfg, sampled)
            except Exception as exc:  # noqa: BLE001 - a clip that cannot be read is a rejected row
                reject(batch, int(i), f"motion_error: {type(exc).__name__}: {exc}")
                continue
            score = m.score
            scores[i], pairs[i] = score, json.dumps(m.pairs)   # JSON in flight (see JSON_LIST_COLUMNS)
            camera[i], subject[i] = m.camera, m.subject
            for col, value in zip(params, (m.pan_x, m.pan_y, m.zoom, m.roll), strict=True):
                col[i] = value
            moves[i] = name(m)
            if score is None:
                continue
            fixed = cfg.min_camera is not None and m.camera is not None and m.camera < cfg.min_camera
            if fixed and (cfg.min_subject is None or m.subject < cfg.min_subject):
                need = "" if cfg.min_subject is None else f", subject_motion {m.subject:.2f} < {cfg.min_subject:g}"
                reject(batch, int(i), f"static: camera_motion {m.camera:.2f} < {cfg.min_camera:g}{need}")
            elif cfg.min_score is not None and score < cfg.min_score:
                reject(batch, int(i), f"motion_score: {score:.2f} < {cfg.min_score:g}")
            elif cfg.max_score is not None and score > cfg.max_score:
                reject(batch, int(i), f"motion_score: {score:.2f} > {cfg.max_score:g}")
        return batch


def camera_moves_of(videos: list, fps: float) -> list:
    """Each generated video's ``camera_move`` (a list of PIL frames at ``fps``), measured as a clip's
    is: grey frames 160 px wide, flow between every consecutive pair (samples are a few frames long,
    so all are used rather than 2 per second), the registered affine fit, ``CameraMove``'s default
    thresholds. None for a video of fewer than two frames."""
    from PIL import Image

    name, cfg = CameraMove(), MotionConfig(rate=fps)
    out = []
    for frames in videos:
        if len(frames) < 2:
            out.append(None)
            continue
        w, h = frames[0].size
        size = (160, max(8, round(160 * h / w)))
        grey = np.stack([np.asarray(f.convert("L").resize(size, Image.BILINEAR)) for f in frames])
        out.append(name(clip_motion(np.arange(len(frames)) / fps, grey, cfg, sampled=True)))
    return out


__all__ = ["MOVES", "CameraMove", "FrameSampler", "Motion", "MotionConfig", "MotionScore", "MotionStageConfig",
           "affine_fit", "camera_moves_of", "camera_of", "clip_motion", "decompose", "flow_parts", "motion_score",
           "pack_frames", "read_for_motion", "sample_indices", "unpack_frames"]
