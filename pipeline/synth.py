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
                rotation: int | None = None, crf: int = 23, audio_s: float = 0.0, repeatable: bool = False) -> None:
    """Encode RGB frames as H.264 (yuv420p) in an MP4/MKV; ``times_s`` sets each frame's time.
    ``repeatable``: one thread and no macroblock-tree rate control, so the same frames give the same
    bytes on every run (as the clips stage encodes; benches that compare runs need it)."""
    import av

    height, width = frames[0].shape[:2]
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf), **({"threads": "1", "x264-params": "mbtree=0"} if repeatable else {})}
        if repeatable:
            stream.codec_context.thread_count = 1
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


def write_huge_video(path: str, side: int = 16000, frames: int = 2) -> int:
    """A tiny file that claims huge frames: ``frames`` black ``side`` x ``side`` H.264 frames (752 KB
    at 16000). Encoding holds a frame (~1.2 GB at 16000): make it in a child process. Returns its size."""
    import os

    import av

    with av.open(path, "w") as c:
        s = c.add_stream("libx264", rate=1)
        s.width, s.height, s.pix_fmt = side, side, "yuv420p"
        s.options = {"preset": "ultrafast"}
        frame = av.VideoFrame(side, side, "yuv420p")
        for plane in frame.planes:
            plane.update(bytes(plane.buffer_size))
        for i in range(frames):
            frame.pts = i
            for packet in s.encode(frame):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return os.path.getsize(path)


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
        kw.setdefault("repeatable", True)       # the same corpus bytes on every run: the demo's numbers repeat
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


def camera_move(image: np.ndarray, n: int, width: int, height: int, fps: float, seed: int, *,
                pan: float = 0.0, zoom: float = 0.0, shake: float = 0.0, angle_deg: float = 0.0,
                roll: float = 0.0) -> list[np.ndarray]:
    """``n`` frames of a virtual camera over a still ``image`` (RGB): a pan at ``pan`` % of the
    frame width per second in direction ``angle_deg`` (0: the camera turns right, 90: it tilts
    down, 180: left, 270: up), a zoom of ``zoom`` % of scale per second (> 0: in), a ``roll`` in
    degrees per second (> 0: the camera rolls clockwise, the picture turns anticlockwise) and a
    handheld ``shake`` (a smoothed random walk, % of width per second). Everything is in frame
    units per second, so the same numbers mean the same motion at every size and rate."""
    import cv2

    rng = np.random.default_rng(seed)
    src_h, src_w = image.shape[:2]
    seconds = n / fps
    # the view covers the frame's aspect at a size that leaves room for the whole move
    travel = (abs(pan) + 3 * shake) / 100 * seconds
    view_w = min(src_w / (1 + travel + abs(zoom) / 100 * seconds), src_h * width / height / (1 + travel))
    scale = width / view_w
    walk = np.cumsum(rng.normal(0, 1, (n, 2)), axis=0)
    kernel = np.ones(max(1, int(fps / 4))) / max(1, int(fps / 4))
    walk = np.stack([np.convolve(walk[:, k], kernel, mode="same") for k in range(2)], axis=1)
    walk -= walk[0]
    walk *= shake / 100 * width / fps / max(1e-9, float(np.abs(np.diff(walk, axis=0)).mean() or 1))
    a = np.deg2rad(angle_deg)
    frames = []
    for i in range(n):
        t = i / fps
        s = scale * (1 + zoom / 100 * t)
        cx = src_w / 2 + (pan / 100 * width * t * np.cos(a) + walk[i, 0]) / s - travel * view_w / 2 * np.cos(a)
        cy = src_h / 2 + (pan / 100 * width * t * np.sin(a) + walk[i, 1]) / s - travel * view_w / 2 * np.sin(a)
        c, r = np.cos(np.radians(roll * t)), np.sin(np.radians(roll * t))
        rot = np.array([[c, r], [-r, c]]) * s          # the picture turned anticlockwise (y down), scaled
        m = np.concatenate([rot, (np.array([width / 2, height / 2]) - rot @ np.array([cx, cy]))[:, None]], axis=1)
        m = m.astype(np.float32)
        frames.append(cv2.warpAffine(image, m, (width, height), flags=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR,
                                     borderMode=cv2.BORDER_REFLECT))
    return frames


def cartoon(n: int, width: int, height: int, fps: float, seed: int, *, boil: bool = True) -> list[np.ndarray]:
    """A mostly static cel animation: flat-coloured shapes with dark outlines on a flat
    background, drawn on twos (each drawing held two frames); a character blinks and talks (a
    small mouth and eyes change), and with ``boil`` every drawing's shapes jitter by a quarter of a
    percent of the frame (about 2 px at 720p), as hand-drawn lines do. No camera move."""
    import cv2

    rng = np.random.default_rng(seed)
    u = min(width, height) / 100          # drawing unit
    bg = rng.integers(60, 230, 3).tolist()
    shapes = [(rng.integers(0, 3), rng.uniform(0.1, 0.9, 2) * (width, height), rng.uniform(8, 25) * u,
               rng.integers(30, 250, 3).tolist()) for _ in range(6)]
    face = np.array([width * rng.uniform(0.35, 0.65), height * rng.uniform(0.4, 0.6)])
    frames, drawing = [], None
    for i in range(n):
        if i % 2 == 0:                                  # on twos
            j = rng.normal(0, 0.25 * u if boil else 0, (len(shapes) + 1, 2))
            img = np.full((height, width, 3), bg, np.uint8)
            for k, (kind, c, r, col) in enumerate(shapes):
                p = tuple(int(v) for v in c + j[k])
                if kind == 0:
                    cv2.circle(img, p, int(r), col, -1, cv2.LINE_AA)
                    cv2.circle(img, p, int(r), (20, 20, 20), max(1, int(u)), cv2.LINE_AA)
                else:
                    q1, q2 = (int(p[0] - r), int(p[1] - r / 2)), (int(p[0] + r), int(p[1] + r / 2))
                    cv2.rectangle(img, q1, q2, col, -1)
                    cv2.rectangle(img, q1, q2, (20, 20, 20), max(1, int(u)))
            f = tuple(int(v) for v in face + j[-1])
            cv2.circle(img, f, int(18 * u), (200, 170, 140), -1, cv2.LINE_AA)
            cv2.circle(img, f, int(18 * u), (20, 20, 20), max(1, int(u)), cv2.LINE_AA)
            blink = (i // 2) % int(max(2, fps)) == 0       # about once every two seconds
            for dx in (-6, 6):
                e = (int(f[0] + dx * u), int(f[1] - 4 * u))
                cv2.ellipse(img, e, (int(2 * u), max(1, int((0.3 if blink else 2.5) * u))), 0, 0, 360, (20, 20, 20), -1)
            mouth = int(rng.uniform(0.5, 4) * u)           # talking
            cv2.ellipse(img, (f[0], int(f[1] + 7 * u)), (int(5 * u), mouth), 0, 0, 360, (90, 20, 30), -1)
            drawing = img
        frames.append(drawing.copy())
    return frames
