"""Motion score: dense optical flow between frames sampled at a low rate (SVD's LVD filter).

Frames are taken every 1/``rate`` seconds (by timestamp, so variable frame rate is handled),
as grey images ``width`` pixels wide; OpenCV's DIS flow (Kroeger et al., 2016) runs between
consecutive samples. The unit is resolution- and rate-free: **mean flow magnitude in percent of
the frame width per second** (a pan across the whole width in 4 s scores 25). Per-pair values
are kept for later motion-bucket conditioning.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.contract.config import option
from pipeline.contract.schema import IMAGE, IMAGE_EXT, MOTION_PAIRS, MOTION_SCORE
from pipeline.contract.stage import Stage, active, column, reject


@dataclass
class MotionConfig:
    rate: float = option(2.0, "frames per second sampled for flow (SVD: 2)", min=0.1)
    width: int = option(160, "width of the grey frames the flow runs on", min=32, max=1024)
    preset: str = option("fast", "DIS preset: ultrafast, fast or medium")


_PRESETS = {"ultrafast": 0, "fast": 1, "medium": 2}


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


def flow_magnitudes(grey: np.ndarray, times: np.ndarray, config: MotionConfig | None = None) -> np.ndarray:
    """Per consecutive pair of ``grey`` frames (n, h, w uint8): mean flow, % of width per second."""
    import cv2

    cfg = config or MotionConfig()
    dis = cv2.DISOpticalFlow_create(_PRESETS.get(cfg.preset, 1))
    out = []
    for a in range(1, len(grey)):
        dt = float(times[a] - times[a - 1])
        if dt <= 0:
            continue
        flow = dis.calc(grey[a - 1], grey[a], None)
        mag = float(np.sqrt((flow ** 2).sum(axis=-1)).mean())
        out.append(100.0 * mag / grey.shape[2] / dt)
    return np.asarray(out, dtype=np.float64)


def motion_score(times: np.ndarray, luma: np.ndarray, config: MotionConfig | None = None) -> tuple[float | None, list[float]]:
    """(mean, per-pair) motion of one clip from its frames' times and luma planes (n, h, w)."""
    cfg = config or MotionConfig()
    idx = sample_indices(np.asarray(times, dtype=np.float64), cfg.rate)
    if len(idx) < 2:
        return None, []
    pairs = flow_magnitudes(np.ascontiguousarray(luma[idx]), np.asarray(times)[idx], cfg)
    if not len(pairs):
        return None, []
    return round(float(pairs.mean()), 4), [round(float(p), 4) for p in pairs]


@dataclass
class MotionStageConfig(MotionConfig):
    min_score: float | None = option(None, "reject clips whose motion_score is below this (static clips; "
                                     "unit: % of frame width per second)", min=0)
    max_score: float | None = option(None, "reject clips above this (shaky or flickering footage)", min=0)


class MotionScore(Stage):
    """The ``motion`` stage: decodes each clip small and adds ``motion_score`` and ``motion_pairs``."""

    name = "motion"
    Config = MotionStageConfig
    after = ("clips",)
    batch_size = 8

    def __call__(self, batch):
        import io
        import json

        from video.frames import read_small

        keep = active(batch)
        scores, pairs = column(batch, MOTION_SCORE), column(batch, MOTION_PAIRS)
        cfg = self.config
        for i in np.flatnonzero(keep):
            if batch.get(IMAGE_EXT) is None or batch[IMAGE_EXT][i] != "mp4" or batch[IMAGE][i] is None:
                continue
            try:
                small = read_small(io.BytesIO(batch[IMAGE][i]), width=cfg.width)
                score, per_pair = motion_score(small.times, small.yuv[..., 0], cfg)
            except Exception as exc:  # noqa: BLE001 - a clip that cannot be read is a rejected row
                reject(batch, int(i), f"motion_error: {type(exc).__name__}: {exc}")
                continue
            scores[i], pairs[i] = score, json.dumps(per_pair)   # JSON in flight (see JSON_LIST_COLUMNS)
            if score is None:
                continue
            if cfg.min_score is not None and score < cfg.min_score:
                reject(batch, int(i), f"motion_score: {score:.2f} < {cfg.min_score:g}")
            elif cfg.max_score is not None and score > cfg.max_score:
                reject(batch, int(i), f"motion_score: {score:.2f} > {cfg.max_score:g}")
        return batch


__all__ = ["MotionConfig", "MotionScore", "MotionStageConfig", "motion_score", "flow_magnitudes", "sample_indices"]
