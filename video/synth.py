"""Generated videos with known content (shots, cuts, motion) for tests, the demo and benchmarks.

Written with PyAV's libx264 (OpenCV's wheel here cannot write H.264). Frame timestamps can be
given explicitly, to make variable-frame-rate files.
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np


def shot(n: int, width: int, height: int, seed: int, motion: float = 0.0) -> list[np.ndarray]:
    """``n`` frames of one shot: a seeded random scene of smooth blobs, panning by ``motion``
    pixels per frame (0 = a static camera)."""
    rng = np.random.default_rng(seed)
    big_w, big_h = width + int(abs(motion) * n) + 8, height + 8
    yy, xx = np.mgrid[0:big_h, 0:big_w].astype(np.float32)
    canvas = np.zeros((big_h, big_w, 3), np.float32)
    for _ in range(12):
        cx, cy = rng.uniform(0, big_w), rng.uniform(0, big_h)
        r = rng.uniform(height / 10, height / 3)
        colour = rng.uniform(0, 255, 3)
        w = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None]
        canvas = canvas * (1 - w) + colour * w
    canvas += rng.normal(0, 6, canvas.shape)          # texture, so flow has something to track
    canvas = np.clip(canvas, 0, 255).astype(np.uint8)
    frames = []
    for i in range(n):
        x0 = int(round(abs(motion) * i)) if motion >= 0 else int(round(abs(motion) * (n - 1 - i)))
        frames.append(np.ascontiguousarray(canvas[4:4 + height, x0:x0 + width]))
    return frames


def write_video(path: str, frames: list[np.ndarray], fps: float = 10.0, *, times_s: list[float] | None = None,
                rotation: int | None = None, crf: int = 23, audio_s: float = 0.0) -> None:
    """Encode RGB frames as H.264 (yuv420p) in an MP4/MKV; ``times_s`` sets each frame's time."""
    import av

    height, width = frames[0].shape[:2]
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf)}
        if times_s is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
            stream.time_base = Fraction(1, 1000)
        if rotation:
            stream.set_display_rotation(rotation)
        audio = None
        if audio_s:
            audio = container.add_stream("aac", rate=16000)
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            if times_s is not None:
                frame.pts = int(round(times_s[i] * 1000))
                frame.time_base = Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
        if audio is not None:
            _write_tone(container, audio, audio_s)


def write_audio_only(path: str, seconds: float = 1.0) -> None:
    import av

    with av.open(path, "w") as container:
        _write_tone(container, container.add_stream("aac", rate=16000), seconds)


def _write_tone(container, stream, seconds: float) -> None:
    import av

    samples = int(16000 * seconds)
    t = np.arange(samples, dtype=np.float32) / 16000
    tone = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None, :]
    for start in range(0, samples, 1024):
        chunk = np.ascontiguousarray(tone[:, start:start + 1024])
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
        frame.sample_rate = 16000
        frame.pts = start
        container.mux(stream.encode(frame))
    container.mux(stream.encode())


__all__ = ["shot", "write_video", "write_audio_only"]
