"""Cut-detection speed on one core, decode included: winnow against PySceneDetect's ContentDetector
in the same run, per resolution class.

    python bench/video_cuts_speed.py [--repeat 2]

Files: the 720p videos of ../shared/data/videos, and the same footage re-encoded (x264, crf 20)
at 640x360 and 160x90. Each detector runs in its own process pinned to one CPU
(``os.sched_setaffinity``), so multi-threaded decoders get no more than one core; the best of
``--repeat`` runs counts. ``winnow-deblock`` is winnow with ``cuts.deblock: true`` (the decoder's
deblocking filter on), to show what skipping it buys. PySceneDetect: ``pip install --no-deps scenedetect``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
sys.path.insert(0, ROOT)
VIDEOS = os.path.join(ROOT, "..", "shared", "data", "videos")
SOURCES = ["pyscenedetect/testvideo.mp4", "imageio/cockatoo.mp4"]


def _child(detector: str, path: str) -> None:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    t = time.perf_counter()
    if detector.startswith("winnow"):
        from video.cuts import CutConfig, detect_cuts, read_for_cuts

        f = read_for_cuts(path, CutConfig(deblock=detector == "winnow-deblock"))
        n = len(f.times)
        detect_cuts(f.times, f.yuv, f.fps)
    else:
        import scenedetect

        video = scenedetect.open_video(path)
        manager = scenedetect.SceneManager()
        manager.add_detector(scenedetect.ContentDetector())
        manager.detect_scenes(video)
        n = video.frame_number
    print(json.dumps({"frames": n, "seconds": time.perf_counter() - t}))


def timed(detector: str, path: str, repeat: int) -> tuple[int, float]:
    best = None
    for _ in range(repeat):
        out = subprocess.run([sys.executable, __file__, "--child", detector, path], capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(out.stderr.strip().splitlines()[-1])
        r = json.loads(out.stdout.strip().splitlines()[-1])
        best = r if best is None or r["seconds"] < best["seconds"] else best
    return best["frames"], best["seconds"]


def rescale(src: str, width: int, height: int, folder: str) -> str:
    import av
    import numpy as np

    from pipeline.synth import write_video

    frames, fps = [], 25.0
    with av.open(src) as c:
        s = c.streams.video[0]
        fps = float(s.average_rate or 25)
        for f in c.decode(s):
            frames.append(np.asarray(f.to_image().resize((width, height))))
    out = os.path.join(folder, f"{os.path.splitext(os.path.basename(src))[0]}_{width}x{height}.mp4")
    write_video(out, frames, fps=fps, crf=20)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(*args.child)
        return 0
    sources = [os.path.join(VIDEOS, s) for s in SOURCES if os.path.exists(os.path.join(VIDEOS, s))]
    if not sources:
        print(f"skipped: no videos in {VIDEOS}")
        return 0
    folder = tempfile.mkdtemp(prefix="winnow-cutspeed-")
    classes = {"1280x720": sources, "640x360": [rescale(s, 640, 360, folder) for s in sources],
               "160x90": [rescale(s, 160, 90, folder) for s in sources]}
    print("one core each, decode included, best of", args.repeat)
    for name, files in classes.items():
        tot = {"winnow": [0, 0.0], "winnow-deblock": [0, 0.0], "pyscenedetect": [0, 0.0]}
        for path in files:
            for det in tot:
                n, sec = timed(det, path, args.repeat)
                tot[det][0] += n
                tot[det][1] += sec
        w, d, p = (tot[k][0] / tot[k][1] for k in ("winnow", "winnow-deblock", "pyscenedetect"))
        print(f"  {name:>9}: winnow {w:7.0f} frames/s ({w / p:.2f}x), with the deblocking filter {d:7.0f} "
              f"({d / p:.2f}x), PySceneDetect ContentDetector {p:7.0f} frames/s  ({tot['winnow'][0]} frames)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
