"""Small frames for analysis, read straight from the decoder's YUV planes (no swscale).

Cut detection and motion need tiny frames: subsampling the Y, U and V planes with numpy strides
costs ~nothing, where swscale's resize halves the decode rate (bench/video_decode.py). Every
frame keeps its presentation time, so variable-frame-rate files cut at the right second.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.contract.media import open_video


@dataclass
class SmallFrames:
    times: np.ndarray      # (n,) seconds, presentation order
    yuv: np.ndarray        # (n, h, w, 3) uint8: Y, U, V sampled on the same grid
    fps: float             # frames / duration


def _plane(frame, index: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    plane = frame.planes[index]
    arr = np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)
    return arr[np.ix_(rows, cols)]


def frames_between(container, stream, start_s: float | None = None, end_s: float | None = None):
    """Decoded frames of ``stream`` with ``start_s <= time < end_s`` (stream seconds): seeks to
    the keyframe before ``start_s`` and drops what comes before it, so a window of a long file
    costs only its own decoding."""
    if start_s is not None and start_s > 0 and stream.time_base:
        container.seek(int(start_s / stream.time_base), stream=stream, backward=True, any_frame=False)
    for frame in container.decode(stream):
        t = frame.time
        if t is None:
            yield frame
            continue
        if start_s is not None and t < start_s - 1e-6:
            continue
        if end_s is not None and t >= end_s - 1e-6:
            break
        yield frame


def read_small(source, width: int = 64, max_frames: int | None = None, start_s: float | None = None,
               end_s: float | None = None, deblock: bool = True, reference_only: bool = False) -> SmallFrames:
    """Decode the frames of the first video stream (those in [start_s, end_s) when given) and
    keep a ``width``-wide YUV copy of each. ``deblock=False`` skips the decoder's in-loop
    deblocking filter (FFmpeg's ``skip_loop_filter``; H.264 and HEVC honour it): every frame is
    still decoded, 20-50 % faster on one core, with block edges a few levels off -- invisible to
    the cut detector (bench/video_cuts.py), wrong for anything that is encoded or shown.
    ``reference_only`` skips the frames no other frame refers to (most B-frames): for sampling
    at a low rate, where the nearest decoded frame with its own timestamp will do."""
    import av

    av.logging.set_libav_level(av.logging.ERROR)
    times, frames = [], []
    with open_video(source) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if not deblock:
            stream.codec_context.options = {**stream.codec_context.options, "skip_loop_filter": "all"}
        if reference_only:
            stream.codec_context.skip_frame = "NONREF"
        grid = None
        for frame in frames_between(container, stream, start_s, end_s):
            if frame.format.name not in ("yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p"):
                frame = frame.reformat(format="yuv420p")
            if grid is None:
                w, h = frame.width, frame.height
                height = max(1, round(width * h / w))
                rows = np.linspace(0, h - 1, height).astype(int)
                cols = np.linspace(0, w - 1, width).astype(int)
                cw, ch = frame.planes[1].width, frame.planes[1].height
                grid = (rows, cols, (rows * ch // h).clip(0, ch - 1), (cols * cw // w).clip(0, cw - 1))
            rows, cols, crows, ccols = grid
            frames.append(np.stack([_plane(frame, 0, rows, cols), _plane(frame, 1, crows, ccols),
                                    _plane(frame, 2, crows, ccols)], axis=-1))
            times.append(float(frame.time) if frame.time is not None else len(times) / float(stream.average_rate or 25))
            if max_frames and len(frames) >= max_frames:
                break
    if not frames:
        return SmallFrames(np.zeros(0), np.zeros((0, 1, width, 3), np.uint8), 0.0)
    t = np.asarray(times)
    order = np.argsort(t, kind="stable")
    t = t[order]
    span = (t[-1] - t[0]) + (t[-1] - t[-2] if len(t) > 1 else 0.0)
    return SmallFrames(t, np.stack(frames)[order], len(t) / span if span > 0 else 0.0)


__all__ = ["frames_between", "read_small", "SmallFrames"]
