"""Motion per labelled video of ../shared/data/videos: static vs moving, with DIS and Farneback flow
in the same run, each split into camera and subject motion.

    python bench/video_motion.py

Each file is labelled static (a fixed camera, even with cars passing or the light changing; flat
frames) or moving (handheld, panning, action). Per file and flow method: ``motion_score`` (the
mean), ``camera_motion`` and ``subject_motion`` (% of frame width per second, 2 fps samples of
160-px grey frames), frames/s (decode included); then, per column and method, the AUC of static vs
moving (1.0: one threshold separates them all) and the range of thresholds that does.
"""
from __future__ import annotations

import os
import sys
import time

sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from video.frames import read_small  # noqa: E402
from video.motion import MotionConfig, clip_motion  # noqa: E402

VIDEOS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "videos")
LABELLED = [("dvrscan/traffic_camera.mp4", "static", "fixed camera, cars passing"),
            ("dvrscan/issue53_brightness_change.avi", "static", "fixed camera, light changes"),
            ("pyscenedetect/fades.mp4", "static", "flat frames fading"),
            ("imageio/cockatoo.mp4", "moving", "handheld, fast camera motion"),
            ("imageio/realshort.mp4", "moving", "handheld"),
            ("mmaction2/demo__demo.mp4", "moving", "shaky action clip"),
            ("mmaction2/tests__data__test.mp4", "moving", "action clip")]


def auc(static: list[float], moving: list[float]) -> float:
    """P(a moving clip scores above a static one), ties half."""
    pairs = [(m > s) + 0.5 * (m == s) for s in static for m in moving]
    return sum(pairs) / len(pairs) if pairs else float("nan")


def main() -> int:
    if not os.path.isdir(VIDEOS):
        print(f"skipped: {VIDEOS} not found")
        return 0
    rows = []
    for name, label, what in LABELLED:
        path = os.path.join(VIDEOS, name)
        if not os.path.exists(path):
            continue
        frames = read_small(path, width=160)
        for method in ("dis", "farneback"):
            t = time.perf_counter()
            m = clip_motion(frames.times, frames.yuv[..., 0], MotionConfig(method=method))
            dt = time.perf_counter() - t
            rows.append((name, label, method, m))
            print(f"{name:38s} {label:7s} {method:9s} motion {m.score:6.2f}  camera {m.camera:6.2f}  "
                  f"subject {m.subject:6.2f}  ({len(m.pairs)} pairs, {len(frames.times) / dt:5.0f} frames/s of flow; "
                  f"{what})")
    print()
    for method in ("dis", "farneback"):
        for col in ("score", "camera", "subject"):
            st = [getattr(m, col) for _, lab, me, m in rows if me == method and lab == "static"]
            mv = [getattr(m, col) for _, lab, me, m in rows if me == method and lab == "moving"]
            gap = f"thresholds in ({max(st):.2f}, {min(mv):.2f}) separate them" if min(mv) > max(st) else "no threshold separates them"
            print(f"  {method:9s} {col:8s} AUC static vs moving {auc(st, mv):.3f}; {gap}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
