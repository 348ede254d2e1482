"""Encode clips as H.264 MP4 in memory with PyAV's libx264 (the opencv-python-headless wheel
cannot write H.264).

A ``ClipEncoder`` takes decoded source frames one at a time and keeps their timestamps (the
source stream's own time base), so a variable-frame-rate source stays variable and a clip's
duration is exact. Frames are scaled to the output size with even sides and rotated upright
(players then need no display matrix), and the first, middle and last frame are kept as small
JPEGs for the per-clip model stages.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np


def output_size(display_w: int, display_h: int, max_side: int) -> tuple[int, int]:
    """Upright output size: longest side at most ``max_side``, never upscaled, both sides even
    (yuv420p needs them even)."""
    scale = min(1.0, max_side / max(display_w, display_h))
    w = max(2, int(round(display_w * scale / 2)) * 2)
    h = max(2, int(round(display_h * scale / 2)) * 2)
    return w, h


def jpeg(rgb: np.ndarray, max_side: int, quality: int = 90) -> bytes:
    from PIL import Image

    img = Image.fromarray(rgb)
    if max(img.size) > max_side:
        s = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@dataclass
class EncodedClip:
    data: bytes
    width: int
    height: int
    num_frames: int
    start_s: float           # first frame's time
    end_s: float             # last frame's time plus one frame step
    keyframes: list[bytes] = field(default_factory=list)   # first, middle, last (JPEG)
    motion_frames: bytes | None = None    # video.motion.pack_frames of the motion stage's samples

    @property
    def fps(self) -> float:
        span = self.end_s - self.start_s
        return round(self.num_frames / span, 4) if span > 0 else 0.0


class ClipEncoder:
    """One clip: ``add`` source frames in time order, then ``finish``."""

    def __init__(self, width: int, height: int, rotation: int, time_base: Fraction, mid_s: float, *,
                 crf: int = 20, preset: str = "veryfast", keyframe_side: int = 512, threads: int = 1,
                 motion: tuple[float, int] | None = None):
        import av

        self.width, self.height, self.rotation = width, height, int(rotation) % 360
        self.mid_s, self.keyframe_side = mid_s, keyframe_side
        self.buf = io.BytesIO()
        self.container = av.open(self.buf, "w", format="mp4")
        self.stream = self.container.add_stream("libx264")
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
        self.stream.codec_context.time_base = time_base
        self.stream.time_base = time_base
        # A resumed run must re-create a clip byte for byte. With macroblock-tree rate control on,
        # libx264 here gave different bytes for the same frames now and then (measured: 2 of 12
        # encodes of a fade); with it off, 96 of 96 were identical. It costs a few % of size.
        self.stream.options = {"crf": str(crf), "preset": preset, "threads": str(threads), "x264-params": "mbtree=0"}
        self.stream.codec_context.thread_count = threads
        self.time_base = time_base
        self.first_pts: int | None = None
        self.last_pts = -1
        self.times: list[float] = []
        self.first = self.middle = self.last = None
        # (rate, width): keep the grey frames the motion stage samples, from the upright frames
        # being encoded (the motion stage then decodes nothing)
        self.sampler = None
        if motion is not None:
            from video.motion import FrameSampler

            self.sampler = FrameSampler(*motion)

    def _upright(self, frame):
        """Scale (and rotate) a source frame to the output size, as a new yuv420p frame."""
        import av

        if self.rotation:
            turned = self.rotation in (90, 270)
            scaled = frame.reformat(width=self.height if turned else self.width,
                                    height=self.width if turned else self.height, format="rgb24")
            # the display matrix rotates counter-clockwise by ``rotation`` degrees
            rgb = np.ascontiguousarray(np.rot90(scaled.to_ndarray(), k=self.rotation // 90))
            return av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
        out = frame.reformat(width=self.width, height=self.height, format="yuv420p")
        return out

    def add(self, frame, t: float) -> None:
        out = self._upright(frame)
        pts = int(frame.pts) if frame.pts is not None else int(round(t / self.time_base))
        if self.first_pts is None:
            self.first_pts = pts
        rel = max(pts - self.first_pts, self.last_pts + 1)   # strictly increasing, even for broken files
        self.last_pts = rel
        out.pts, out.time_base = rel, self.time_base
        out.pict_type = 0          # let x264 choose frame types; the source's I/P/B marks are not ours
        self.container.mux(self.stream.encode(out))
        self.times.append(t)
        if self.sampler is not None:
            self.sample(out, t)
        if self.first is None:
            self.first = out
        if self.middle is None and t >= self.mid_s:
            self.middle = out
        self.last = out

    def sample(self, out, t: float) -> None:
        """Hand an upright frame's Y plane to the motion sampler."""
        plane = out.planes[0]
        self.sampler.add(t, np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)[: self.height, : self.width])

    def finish(self) -> EncodedClip | None:
        self.container.mux(self.stream.encode())
        self.container.close()
        if not self.times:
            return None
        step = float(np.median(np.diff(self.times))) if len(self.times) > 1 else 0.0
        picks = [self.first, self.middle or self.last, self.last]
        keyframes = [jpeg(f.to_ndarray(format="rgb24"), self.keyframe_side) for f in picks]
        return EncodedClip(self.buf.getvalue(), self.width, self.height, len(self.times), self.times[0],
                           self.times[-1] + step, keyframes,
                           self.sampler.packed() if self.sampler is not None else None)


__all__ = ["ClipEncoder", "EncodedClip", "jpeg", "output_size"]
