"""Probe a video file with PyAV: what a curation run needs to know before decoding it.

Reads the container header and demuxes packets (no decoding except one frame for the display
rotation), so it costs milliseconds: duration, frame count, average fps, whether the frame rate
is variable (from packet timestamps), coded and display size (rotation and sample aspect ratio
applied), codec, audio. Anything unreadable is a ``ProbeError`` whose message is the reject
reason: broken containers, no video stream (audio-only), zero frames.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from fractions import Fraction

import numpy as np


class ProbeError(Exception):
    """A video that cannot be used; the message is the reject reason."""


@dataclass
class ProbeLimits:
    """Bounds checked from the container before any frame is decoded."""
    max_pixels: int = 7680 * 4320          # coded width x height (8K UHD)
    max_duration_s: float = 6 * 3600.0
    max_gap_s: float = 60.0                # longest plausible time between two consecutive frames


@dataclass
class VideoInfo:
    codec: str
    width: int                 # coded size
    height: int
    display_width: int         # after rotation and sample aspect ratio: what a player shows
    display_height: int
    rotation: int              # degrees, as the display matrix says (-90, 90, 180, 0)
    sample_aspect_ratio: float
    fps: float                 # average frame rate (frames / duration)
    num_frames: int
    duration_s: float
    variable_frame_rate: bool
    has_audio: bool
    start_s: float = 0.0       # time of the first frame on the stream's clock (clip times count from it)

    def to_dict(self) -> dict:
        return asdict(self)


def _open(source, limits: ProbeLimits | None = None):
    """Open a container through the house's one bounded opener (``pipeline.contract.media``): the
    decoders get ``max_pixels`` too, so a frame bigger than the cap is never allocated, even while
    FFmpeg reads the stream parameters."""
    from pipeline.contract.media import MediaError, MediaLimits, open_video

    if isinstance(source, (bytes, bytearray)) and not source:
        raise ProbeError("probe_error: empty file")
    cap = limits.max_pixels if limits else 2 ** 31 - 1
    try:
        return open_video(source, MediaLimits(max_pixels=cap, max_decoded_bytes=4 * cap))
    except MediaError as exc:
        raise ProbeError(str(exc)) from None


def _check_size(width: int, height: int, limits: ProbeLimits) -> None:
    if width < 0 or height < 0 or width * height > limits.max_pixels:
        raise ProbeError(f"too_large: {width}x{height} frames exceed max_frame_pixels={limits.max_pixels}")


def probe(source, limits: ProbeLimits | None = None) -> VideoInfo:
    """Probe a path, file object or bytes; raises ProbeError with a reject reason.

    Frame size, duration and the gaps between frame timestamps are checked from the container
    and packets before the one frame that is decoded (for the display rotation), so a file
    claiming 16000x16000 frames or an 8-hour timestamp jump costs milliseconds, not gigabytes."""
    import av

    limits = limits or ProbeLimits()
    container = _open(source, limits)
    try:
        if not container.streams.video:
            kind = "audio-only" if container.streams.audio else "no streams"
            raise ProbeError(f"no_video_stream: {kind}")
        stream = container.streams.video[0]
        has_audio = bool(container.streams.audio)
        codec = stream.codec_context.name
        width, height = stream.codec_context.width, stream.codec_context.height
        _check_size(width, height, limits)
        sar = float(stream.sample_aspect_ratio) if stream.sample_aspect_ratio else 1.0
        pts: list[int] = []
        try:
            for packet in container.demux(stream):
                if packet.size and packet.pts is not None:
                    pts.append(packet.pts)
        except av.error.FFmpegError as exc:
            if not pts:
                raise ProbeError(f"probe_error: {type(exc).__name__}: {exc}") from None
        if not pts:
            raise ProbeError("no_frames: the video stream holds no frames")
        times = np.sort(np.asarray(pts, dtype=np.float64)) * float(stream.time_base or Fraction(1, 1))
        steps = np.diff(times)
        if len(steps) and steps.max() > limits.max_gap_s:
            j = int(steps.argmax())
            raise ProbeError(f"bad_timestamps: {steps[j]:.1f} s between frames {j} and {j + 1} "
                             f"(more than max_frame_gap_s={limits.max_gap_s:g})")
        if not np.isfinite(times).all() or times[-1] - times[0] > limits.max_duration_s:
            raise ProbeError(f"too_long: {times[-1] - times[0]:.0f} s of timestamps > max_duration_s="
                             f"{limits.max_duration_s:g}")
        rotation = _rotation(source, stream.index, limits)
        if len(steps):
            duration = float(times[-1] - times[0] + steps[-1])   # the last frame lasts as long as the one before
        else:
            duration = float(stream.duration * stream.time_base) if stream.duration else 0.0
        vfr = bool(len(steps) > 2 and np.median(steps) > 0 and
                   (np.max(steps) - np.min(steps)) > 0.5 * np.median(steps))
        n = len(pts)
        fps = n / duration if duration > 0 else float(stream.average_rate or 0)
        dw, dh = (round(width * sar), height) if sar >= 1 else (width, round(height / sar))
        if rotation % 180:
            dw, dh = dh, dw
        return VideoInfo(codec=codec, width=width, height=height, display_width=int(dw), display_height=int(dh),
                         rotation=int(rotation), sample_aspect_ratio=round(sar, 6), fps=round(fps, 4),
                         num_frames=n, duration_s=round(duration, 4), variable_frame_rate=vfr, has_audio=has_audio,
                         start_s=round(float(times[0]), 6))
    finally:
        container.close()


def _rotation(source, index: int, limits: ProbeLimits) -> int:
    """The display rotation, read from the first decodable frame (PyAV exposes it per frame).
    A stream whose header gave no size is checked on the decoder before the frame is decoded."""
    import av

    if hasattr(source, "seek"):
        source.seek(0)
    container = _open(source, limits)
    try:
        stream = container.streams.video[index] if index < len(container.streams.video) else container.streams.video[0]
        for packet in container.demux(stream):
            for frame in packet.decode():
                _check_size(frame.width, frame.height, limits)
                return int(round(getattr(frame, "rotation", 0) or 0))
    except av.error.FFmpegError:
        return 0
    finally:
        container.close()
    return 0


__all__ = ["probe", "ProbeError", "ProbeLimits", "VideoInfo"]
