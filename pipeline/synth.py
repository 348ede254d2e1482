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


def fade(a: np.ndarray, b: np.ndarray, steps: int) -> list[np.ndarray]:
    """Fade from frame ``a`` to black and up into frame ``b`` (``steps`` frames each way)."""
    ramp = [1 - k / steps for k in range(1, steps + 1)]
    return [(a * g).astype(np.uint8) for g in ramp] + [(b * g).astype(np.uint8) for g in ramp[::-1]]


def text_shot(n: int, width: int, height: int, lines: list[str], motion: float = 1.0) -> list[np.ndarray]:
    """A slowly panning shot of a text poster (for the OCR filter)."""
    from pipeline.corpus import text_image

    big = np.asarray(text_image(lines, size=(width + int(motion * n) + 2, height), font_size=height // 6))
    return [np.ascontiguousarray(big[:, int(motion * i):int(motion * i) + width]) for i in range(n)]


def make_video_corpus(root: str, width: int = 160, height: int = 96, fps: float = 10.0) -> dict[str, dict]:
    """A folder of short generated videos with known cuts and motion, plus broken files.

    Returns, per file name, what a curation run must find: ``cuts`` (seconds), ``motion``
    ("static", "moving" or None) and ``reason`` (reject reason category of an unusable file).
    """
    import os

    os.makedirs(root, exist_ok=True)
    W, H = width, height
    expect: dict[str, dict] = {}

    def put(name: str, frames: list[np.ndarray], caption: str | None, **kw) -> None:
        write_video(os.path.join(root, name), frames, fps=kw.pop("fps", fps), **kw)
        if caption:
            with open(os.path.join(root, os.path.splitext(name)[0] + ".txt"), "w", encoding="utf-8") as fh:
                fh.write(caption)

    put("three_shots.mp4", shot(30, W, H, 1, motion=3) + shot(25, W, H, 2) + shot(40, W, H, 3, motion=-2),
        "a pan, a still view, another pan")
    expect["three_shots.mp4"] = {"cuts": [3.0, 5.5], "motion": None}
    put("static.mp4", shot(50, W, H, 4), "a still view of a garden")
    expect["static.mp4"] = {"cuts": [], "motion": "static"}
    put("pan.mp4", shot(50, W, H, 5, motion=4), "a camera pans across a market")
    expect["pan.mp4"] = {"cuts": [], "motion": "moving"}
    a, b = shot(25, W, H, 6, motion=2), shot(25, W, H, 7, motion=2)
    put("fade.mp4", a + fade(a[-1], b[0], 8) + b, "two scenes joined by a fade through black")
    expect["fade.mp4"] = {"cuts": [], "motion": "moving"}
    put("rotated.mp4", shot(30, H, W, 8, motion=2), "a phone video held upright", rotation=90)
    expect["rotated.mp4"] = {"cuts": [], "motion": "moving"}
    put("poster.mp4", text_shot(30, W * 2, H * 2, ["GRAND OPENING", "SALE 50% OFF", "TODAY ONLY"]),
        "a shop window")
    expect["poster.mp4"] = {"cuts": [], "motion": "moving", "text": True}
    vfr = [i * 0.1 for i in range(20)] + [2.0 + i * 0.25 for i in range(12)]
    put("vfr.mp4", shot(20, W, H, 9, motion=2) + shot(12, W, H, 10, motion=2), "variable frame rate", times_s=vfr)
    expect["vfr.mp4"] = {"cuts": [2.0], "motion": "moving"}
    with open(os.path.join(root, "three_shots.mp4"), "rb") as fh:
        head = fh.read(3000)
    with open(os.path.join(root, "truncated.mp4"), "wb") as fh:
        fh.write(head)
    expect["truncated.mp4"] = {"reason": "probe_error"}
    open(os.path.join(root, "empty.mp4"), "wb").close()
    expect["empty.mp4"] = {"reason": "probe_error"}
    write_audio_only(os.path.join(root, "audio_only.mp4"), 1.0)
    expect["audio_only.mp4"] = {"reason": "no_video_stream"}
    return expect


__all__ = ["fade", "make_video_corpus", "shot", "text_shot", "write_video", "write_audio_only"]
