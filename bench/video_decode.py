"""How fast can frames for cut detection be had here, against PySceneDetect's whole detector?

    python bench/video_decode.py [VIDEO ...]      (default: ../shared/data/videos/pyscenedetect/testvideo.mp4
                                                   and imageio/cockatoo.mp4 when present)

Prints frames/s, all in one run on the same files, for: PySceneDetect's ContentDetector with
its defaults (the baseline; needs ``pip install --no-deps scenedetect``), OpenCV grab (decode
only), PyAV decode only, PyAV decode + swscale to 64x36 RGB, PyAV decode + luma plane
subsampled in numpy, and PyAV with the decoder skipping non-reference or bidirectional frames.
This bounds what a cut detector that decodes every frame can reach on this CPU.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "videos")
DEFAULT = [os.path.join(SHARED, "pyscenedetect", "testvideo.mp4"), os.path.join(SHARED, "imageio", "cockatoo.mp4")]


def pyav(path: str, mode: str) -> tuple[int, float]:
    import av

    av.logging.set_libav_level(av.logging.ERROR)
    t = time.perf_counter()
    n = 0
    with av.open(path) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        if mode in ("NONREF", "BIDIR"):
            s.codec_context.skip_frame = mode
        for frame in c.decode(s):
            if mode == "swscale":
                frame.to_ndarray(width=64, height=36, format="rgb24")
            elif mode == "luma":
                y = frame.planes[0]
                arr = np.frombuffer(y, np.uint8).reshape(-1, y.line_size)[:, : frame.width]
                arr[:: max(1, frame.height // 36), :: max(1, frame.width // 64)].astype(np.float32).mean()
            n += 1
    return n, time.perf_counter() - t


def opencv_grab(path: str) -> tuple[int, float]:
    import cv2

    t = time.perf_counter()
    cap = cv2.VideoCapture(path)
    n = 0
    while cap.grab():
        n += 1
    return n, time.perf_counter() - t


def pyscenedetect(path: str) -> tuple[int, float] | None:
    try:
        from scenedetect import ContentDetector, detect
    except ImportError:
        return None
    from video.probe import probe

    t = time.perf_counter()
    detect(path, ContentDetector())
    return probe(path).num_frames, time.perf_counter() - t


def main(paths: list[str]) -> int:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    paths = [p for p in paths if os.path.exists(p)]
    if not paths:
        print("no videos (give paths, or put ../shared/data/videos beside the checkout)")
        return 0
    for path in paths:
        print(os.path.relpath(path, SHARED) if path.startswith(SHARED) else path)
        base = pyscenedetect(path)
        if base:
            print(f"  {'PySceneDetect ContentDetector (baseline)':42s} {base[0] / base[1]:7.0f} frames/s")
        else:
            print("  PySceneDetect not installed: pip install --no-deps scenedetect")
        rows = [("OpenCV grab (decode only)", opencv_grab(path))]
        for mode, label in [("none", "PyAV decode only"), ("swscale", "PyAV decode + swscale to 64x36 RGB"),
                            ("luma", "PyAV decode + luma plane subsampled"),
                            ("NONREF", "PyAV skipping non-reference frames"),
                            ("BIDIR", "PyAV skipping B-frames")]:
            rows.append((label, pyav(path, mode)))
        total = rows[1][1][0]                     # every frame, as PyAV decodes them
        for label, (n, dt) in rows:
            # rate = source frames covered per second (a skipping decoder covers frames it skips)
            ratio = f"  {(total / dt) / (base[0] / base[1]):5.2f}x baseline" if base else ""
            print(f"  {label:42s} {total / dt:7.0f} frames/s (decoded {n} of {total}){ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or DEFAULT))
