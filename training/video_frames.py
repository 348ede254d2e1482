"""Frames of a training clip: N frames at a sampling rate from a seeded start, decoded from the
clip's MP4 bytes only as far as needed, resized and cropped to a bucket.

Sampling is by time, not frame count, so a variable-frame-rate clip is sampled at the rate it
claims: frame ``k`` is the frame on screen at ``start + k / fps`` (the last one whose presentation
time is at or before it). The rate is the spec's ``target_fps`` when the clip has that many
frames per second, else the clip's own rate; a clip too short for N frames at that rate is
sampled faster, up to ``max_fps`` (never faster than the clip itself), and one that is still too
short, or slower than ``min_fps``, is skipped with its reason (the loader counts skips). The
start is drawn from a generator seeded by (seed, epoch, sample), so a resumed run samples the
same frames. The rate that was used is returned: SVD conditions on it (``fps - 1``).

Decoding seeks to the keyframe before the start and stops after the last sampled frame; only
the N sampled frames are converted to RGB.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.contract.media import open_video
from training.buckets import Bucket, plan_crop


class SkipClip(ValueError):
    """A clip the sampler cannot use; ``reason`` is its category (too_short, fps_too_low, ...)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class FramePlan:
    fps: float               # the sampling rate used (what SVD conditions on)
    times: tuple             # the N sample times, seconds in the clip's own clock


def plan_frames(first_s: float, duration_s: float, clip_fps: float, num_frames: int, target_fps: float,
                min_fps: float, max_fps: float, rng: np.random.Generator) -> FramePlan:
    """The sample times of one clip (see the module doc for the rule)."""
    if clip_fps < min_fps:
        raise SkipClip("fps_too_low", f"{clip_fps:g} fps < min_fps {min_fps:g}")
    fps = min(target_fps, clip_fps)
    last_start = duration_s - (num_frames - 1) / fps - 1 / clip_fps   # the last frame must start inside the clip
    if last_start < -1e-9:
        fastest = min(max_fps, clip_fps)
        need = (num_frames - 1) / (duration_s - 1 / clip_fps) if duration_s > 1 / clip_fps else float("inf")
        if need > fastest + 1e-9:
            raise SkipClip("too_short", f"{duration_s:.2f} s holds {num_frames} frames only above {need:.3g} fps "
                                        f"(at most {fastest:g})")
        fps, last_start = need, 0.0
    start = first_s + float(rng.uniform(0.0, max(last_start, 0.0)))
    return FramePlan(fps, tuple(start + k / fps for k in range(num_frames)))


def pick(frame_times: np.ndarray, targets) -> np.ndarray:
    """For each target time, the index of the frame on screen then: the last with time <= target
    (1 ms of slack for rounding in time bases)."""
    idx = np.searchsorted(np.asarray(frame_times), np.asarray(targets) + 1e-3, side="right") - 1
    return np.clip(idx, 0, len(frame_times) - 1)


def decode_frames(data: bytes, times) -> tuple[list[np.ndarray], np.ndarray]:
    """(RGB frames on screen at ``times``, their presentation times), decoding from the keyframe
    before the first time to the frame after the last."""

    times = list(times)
    got, got_t = [], []
    with open_video(data) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if times[0] > 0 and stream.time_base:
            container.seek(int(times[0] / stream.time_base), stream=stream, backward=True, any_frame=False)
        k, prev = 0, None

        def emit():
            got.append(prev[0].to_ndarray(format="rgb24"))
            got_t.append(prev[1])

        for frame in container.decode(stream):
            t = float(frame.time) if frame.time is not None else 0.0
            while k < len(times) and prev is not None and t > times[k] + 1e-3:   # target k shows the previous frame
                emit()
                k += 1
            if k == len(times):
                break
            prev = (frame, t)
        while k < len(times) and prev is not None:            # targets at or after the clip's last frame
            emit()
            k += 1
    if len(got) != len(times):
        raise SkipClip("decode_error", f"{len(got)} of {len(times)} frames decoded")
    return got, np.asarray(got_t)


def to_bucket(frames: list[np.ndarray], bucket: Bucket, rng: np.random.Generator | None) -> tuple[np.ndarray, tuple]:
    """(N, H, W, 3) uint8 of the bucket's size: every frame resized to cover it and cropped the same
    way; returns the crop as (orig_h, orig_w, top, left)."""
    from PIL import Image

    h, w = frames[0].shape[:2]
    crop = plan_crop(w, h, bucket, rng)
    box = (crop.left, crop.top, crop.left + bucket.width, crop.top + bucket.height)
    out = np.empty((len(frames), bucket.height, bucket.width, 3), np.uint8)
    for i, f in enumerate(frames):
        out[i] = np.asarray(Image.fromarray(f).resize((crop.resize_w, crop.resize_h), Image.BICUBIC).crop(box))
    return out, (h, w, crop.top, crop.left)


__all__ = ["FramePlan", "SkipClip", "decode_frames", "pick", "plan_frames", "to_bucket"]
