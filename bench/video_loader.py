"""Training-clip loading: clips/s and frames/s for 14 frames at 256x384, against a baseline
measured in the same run on the same clips and sample times.

    python bench/video_loader.py [--samples 60] [--frames 14] [--fps 7]

Clips: the first 5 s of each video in ../shared/data/videos (scaled to cover 384x256 and encoded
with x264 at crf 20, default GOP, as curation stores clips), else generated shots. Per sample the
sampler draws 14 times at 7 fps from a seeded start (``training.video_frames.plan_frames``).
``winnow`` decodes from the keyframe before the start to the last sampled frame and converts only
the sampled frames to RGB; the baseline (what a script built on ``torchvision.io.read_video`` or
a plain PyAV loop does) decodes and converts every frame of the clip, then picks. Both crop to
the bucket the same way.
"""
from __future__ import annotations

import argparse
import glob
import io
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
sys.path.insert(0, ROOT)

VIDEOS = os.path.join(ROOT, "..", "shared", "data", "videos")
W, H = 384, 256


def make_clips(limit: int = 6) -> list[tuple[str, bytes, float, int]]:
    """(name, MP4 bytes, fps, frames) of up to ``limit`` 5-second 384x256 clips."""
    import tempfile

    import av

    from pipeline.synth import shot, write_video

    clips = []
    scratch = tempfile.mkdtemp(prefix="winnow-bench-clips-")
    for path in sorted(glob.glob(os.path.join(VIDEOS, "**", "*.mp4"), recursive=True))[:limit]:
        with av.open(path) as c:
            s = c.streams.video[0]
            fps = float(s.average_rate or 25)
            frames = []
            for f in c.decode(s):
                scale = max(W / f.width, H / f.height)
                img = f.to_image().resize((max(W, round(f.width * scale)), max(H, round(f.height * scale))))
                left, top = (img.width - W) // 2, (img.height - H) // 2
                frames.append(np.asarray(img.crop((left, top, left + W, top + H))))
                if len(frames) >= int(5 * fps):
                    break
        if len(frames) >= 30:
            tmp = os.path.join(scratch, f"clip_{len(clips)}.mp4")
            write_video(tmp, frames, fps=fps, crf=20)
            clips.append((os.path.basename(path), open(tmp, "rb").read(), fps, len(frames)))
            os.remove(tmp)
    if not clips:
        for k in range(3):
            tmp = os.path.join(scratch, f"synthetic_{k}.mp4")
            write_video(tmp, shot(150, W, H, k, motion=2.0), fps=30.0, crf=20)
            clips.append((f"synthetic_{k}", open(tmp, "rb").read(), 30.0, 150))
            os.remove(tmp)
    os.rmdir(scratch)                 # empty again: each clip was read and removed
    return clips


def baseline(data: bytes, times) -> list[np.ndarray]:
    import av

    from training.video_frames import pick

    with av.open(io.BytesIO(data)) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        frames, ts = [], []
        for f in c.decode(s):
            frames.append(f.to_ndarray(format="rgb24"))
            ts.append(float(f.time))
    return [frames[i] for i in pick(np.asarray(ts), times)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=60)
    parser.add_argument("--frames", type=int, default=14)
    parser.add_argument("--fps", type=float, default=7.0)
    args = parser.parse_args()

    from training.buckets import Bucket
    from training.schedule import seeded_rng
    from training.video_frames import SkipClip, decode_frames, plan_frames, to_bucket

    clips = make_clips()
    bucket = Bucket(W, H)
    plans = []
    for i in range(args.samples):
        name, data, fps, n = clips[i % len(clips)]
        try:
            plans.append((data, plan_frames(0.0, n / fps, fps, args.frames, args.fps, 3.0, 30.0,
                                             seeded_rng(0, "frames", 0, i))))
        except SkipClip as exc:
            print(f"skip {name}: {exc}")
    print(f"{len(clips)} clips ({', '.join(c[0] for c in clips)}), {len(plans)} samples of {args.frames} frames "
          f"at {args.fps:g} fps, bucket {W}x{H}")
    for label, fn in (("baseline: decode + convert every frame", lambda d, p: baseline(d, p.times)),
                      ("winnow: stop after the last, convert the sampled", lambda d, p: decode_frames(d, p.times)[0])):
        same = []
        t = time.perf_counter()
        for data, p in plans:
            out, _ = to_bucket(fn(data, p), bucket, None)
            same.append(out)
        dt = time.perf_counter() - t
        rate = len(plans) / dt
        print(f"  {label:<52} {rate:7.2f} clips/s  {rate * args.frames:8.1f} frames/s")
        if label.startswith("baseline"):
            base_rate, base_out = rate, same
        else:
            identical = all(np.array_equal(a, b) for a, b in zip(base_out, same, strict=True))
            print(f"  ratio {rate / base_rate:.2f}x; identical frames: {identical}")


if __name__ == "__main__":
    main()
