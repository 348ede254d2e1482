"""Motion score per labelled video of ../shared/data/videos: static cameras must score lowest.

    python bench/video_motion.py

Prints each file's label, motion score (% of frame width per second, DIS flow at 2 fps on
160-px grey frames) and the time it took (decode included).
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from video.frames import read_small  # noqa: E402
from video.motion import motion_score  # noqa: E402

VIDEOS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "videos")
LABELLED = [("dvrscan/traffic_camera.mp4", "static camera, moving cars"),
            ("dvrscan/issue53_brightness_change.avi", "static camera, light changes"),
            ("pyscenedetect/fades.mp4", "flat frames fading"),
            ("imageio/cockatoo.mp4", "handheld, fast camera motion"),
            ("imageio/realshort.mp4", "handheld"),
            ("mmaction2/demo__demo.mp4", "shaky action clip"),
            ("mmaction2/tests__data__test.mp4", "action clip")]


def main() -> int:
    if not os.path.isdir(VIDEOS):
        print(f"skipped: {VIDEOS} not found")
        return 0
    for name, label in LABELLED:
        path = os.path.join(VIDEOS, name)
        if not os.path.exists(path):
            continue
        t = time.perf_counter()
        frames = read_small(path, width=160)
        score, pairs = motion_score(frames.times, frames.yuv[..., 0])
        dt = time.perf_counter() - t
        print(f"{name:42s} {label:32s} motion {score:6.2f}  ({len(pairs)} pairs, {len(frames.times) / dt:5.0f} frames/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
