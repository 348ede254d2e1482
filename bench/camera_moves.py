"""camera_move on generated clips with known moves, and on the real sample videos.

    python bench/camera_moves.py [--per-class 12] [--seed 0]

Generated clips: ``pipeline.synth.camera_move`` over the photographs of ../shared/data/images, at
random sizes (160x90 to 1280x720, portrait and square too) and rates (15-60 fps), 3 s each,
H.264, read as the motion stage reads them (the clips stage's 2-fps hand-off). Each class:

  static      a still camera (a still photo, a patch crossing it, a light change)
  pan_*/tilt_*  3-25 % of the width per second within 10 degrees of the axis, handheld shake up to
              a sixth of the speed
  zoom_*      8-25 % of scale per second, the same shake
  complex     a diagonal pan (30-60 degrees off the axis), a pan and a zoom whose edge speeds are
              within 1.5x of each other, or a roll of 5-15 degrees per second

The thresholds (``camera_static_below`` 1.3, the fixed-camera threshold of bench/video_motion.py,
and ``camera_dominance`` 2) were set before this bench ran, so both halves of the photo split
(``video.splice.split_groups``) are reported; the validation half is the one to quote. Then the
labelled real videos: their columns and names.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from video.motion import MOVES, CameraMove, MotionConfig, clip_motion  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")
SIZES = [(160, 90), (320, 180), (640, 360), (1280, 720), (360, 640), (480, 480)]
RATES = [15.0, 24.0, 30.0, 60.0]
AXES = {"pan_right": 0.0, "tilt_down": 90.0, "pan_left": 180.0, "tilt_up": 270.0}


def spec(move: str, rng) -> dict:
    """camera_move's arguments for one clip of ``move`` (plus the extras a static clip gets)."""
    if move == "static":
        return {"variant": ["still", "subject", "light"][rng.integers(3)]}
    if move in AXES:
        speed = float(rng.uniform(3, 25))
        return {"pan": speed, "angle_deg": AXES[move] + float(rng.uniform(-10, 10)),
                "shake": float(rng.uniform(0, speed / 6))}
    if move.startswith("zoom"):
        z = float(rng.uniform(8, 25))
        return {"zoom": z if move == "zoom_in" else -z, "shake": float(rng.uniform(0, z / 12))}
    kind = rng.integers(3)
    if kind == 0:
        return {"pan": float(rng.uniform(5, 25)), "angle_deg": float(rng.integers(4) * 90 + rng.choice([-1, 1])
                                                                      * rng.uniform(30, 60))}
    if kind == 1:
        z = float(rng.uniform(10, 25)) * rng.choice([-1, 1])
        return {"zoom": z, "pan": abs(z) / 2 * float(rng.uniform(1 / 1.5, 1.5)),
                "angle_deg": float(rng.integers(4) * 90)}
    return {"roll": float(rng.uniform(5, 15)) * rng.choice([-1, 1])}


def clip(move: str, image, rng, folder: str, k: int):
    from pipeline.synth import camera_move, write_video

    w, h = SIZES[rng.integers(len(SIZES))]
    fps = float(RATES[rng.integers(len(RATES))])
    n = int(3 * fps)
    kw = spec(move, rng)
    variant = kw.pop("variant", None)
    frames = camera_move(image, n, w, h, fps, int(rng.integers(1 << 30)), **kw)
    if variant == "subject":                 # a patch of the picture crossing the frame
        side = max(8, h // 4)
        patch = np.ascontiguousarray(frames[0][:side, :side][::-1, ::-1])
        speed = rng.uniform(10, 40) / 100 * w / fps
        for i, f in enumerate(frames):
            x = int(i * speed) % max(1, w - side)
            f[h // 3:h // 3 + side, x:x + side] = patch
    elif variant == "light":
        gain = 1 + 0.5 * np.sin(np.linspace(0, np.pi, n))
        frames = [np.clip(f * g, 0, 255).astype(np.uint8) for f, g in zip(frames, gain, strict=True)]
    path = os.path.join(folder, f"c{k}.mp4")
    write_video(path, frames, fps=fps, crf=20, repeatable=True)
    return path, f"{w}x{h}@{fps:g}", kw, variant


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-class", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import importlib.util

    from PIL import Image

    from video.splice import split_groups

    spec_ = importlib.util.spec_from_file_location("bench_video_motion", os.path.join(os.path.dirname(
        os.path.abspath(__file__)), "video_motion.py"))
    vm = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(vm)
    LABELLED, VIDEOS, handoff = vm.LABELLED, vm.VIDEOS, vm.handoff

    images = os.path.join(DATA, "images")
    photos = sorted(os.path.relpath(os.path.join(d, f), images) for d, _, fs in os.walk(images) for f in fs
                    if f.lower().endswith((".jpg", ".png")))
    if not photos:
        print(f"no photographs under {images}")
        return 1
    _, validate = split_groups([f"photo:images/{p}" for p in photos])
    rng = np.random.default_rng(args.seed)
    name = CameraMove()
    folder = tempfile.mkdtemp(prefix="winnow-camera-")
    rows = []
    t0 = time.perf_counter()
    try:
        for move in MOVES:
            for _ in range(args.per_class):
                photo = photos[rng.integers(len(photos))]
                img = Image.open(os.path.join(images, photo)).convert("RGB")
                if min(img.size) < 200:
                    img = img.resize((img.width * 400 // min(img.size), img.height * 400 // min(img.size)))
                path, where, kw, variant = clip(move, np.asarray(img), rng, folder, len(rows))
                frames = handoff(path, MotionConfig())[0]
                m = clip_motion(frames.times, frames.grey, MotionConfig(), sampled=True)
                half = "validate" if f"photo:images/{photo}" in validate else "tune"
                rows.append((move, name(m), half, f"{where} {os.path.basename(photo)}", kw, variant, m))
                os.remove(path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"{len(rows)} generated clips in {time.perf_counter() - t0:.0f} s "
          f"({len(photos)} photographs, {len(validate)} in the validation half)\n")
    print(f"{'class':10s} {'tune':>12s} {'validate':>12s}   validation errors")
    for move in MOVES:
        line = f"{move:10s}"
        for half in ("tune", "validate"):
            mine = [r for r in rows if r[0] == move and r[2] == half]
            ok = sum(r[1] == move for r in mine)
            line += f" {ok:>3d}/{len(mine):<3d}{(ok / len(mine) if mine else float('nan')):5.2f}"
        wrong = [r for r in rows if r[0] == move and r[2] == "validate" and r[1] != move]
        line += "   " + "; ".join(f"{r[1]} ({r[3]}, {', '.join(f'{k} {v:.1f}' for k, v in r[4].items())}"
                                  f"{', ' + r[5] if r[5] else ''}: pan {r[6].pan_x:.1f}/{r[6].pan_y:.1f} "
                                  f"zoom {r[6].zoom:.1f} roll {r[6].roll:.1f} cam {r[6].camera:.1f})"
                                  for r in wrong)
        print(line)
    val = [r for r in rows if r[2] == "validate"]
    print(f"\nvalidation accuracy overall {np.mean([r[0] == r[1] for r in val]):.3f} ({len(val)} clips); "
          f"lowest class {min(np.mean([r[0] == r[1] for r in val if r[0] == m]) for m in MOVES):.3f}")
    print("\nthe motion stage's cost per clip, on the hand-off frames of the real videos (one process, best of 3):")
    import dataclasses

    for rel, _, _ in LABELLED:
        path = os.path.join(VIDEOS, rel)
        if not os.path.exists(path):
            continue
        frames = handoff(path, MotionConfig())[0]
        seconds = float(frames.times[-1] - frames.times[0]) if len(frames.times) > 1 else 0.0
        cost = {}
        for refine in (0, MotionConfig().camera_refine):
            cfg = dataclasses.replace(MotionConfig(), camera_refine=refine)
            best = np.inf
            for _ in range(3):
                t = time.perf_counter()
                clip_motion(frames.times, frames.grey, cfg, sampled=True)
                best = min(best, time.perf_counter() - t)
            cost[refine] = best
        one, two = cost[0], cost[MotionConfig().camera_refine]
        print(f"  {rel:42s} {seconds:6.1f} s of video: {1000 * one:7.1f} ms without registration "
              f"({seconds / one:6.0f}x real time), {1000 * two:7.1f} ms with ({seconds / two:6.0f}x)")
    print("\nreal videos (../shared/data/videos):")
    print(f"{'file':42s} {'label':8s} {'cam':>6s} {'pan_x':>7s} {'pan_y':>7s} {'zoom':>7s} {'roll':>6s}  camera_move")
    for rel, label, what in LABELLED:
        path = os.path.join(VIDEOS, rel)
        if not os.path.exists(path):
            continue
        frames = handoff(path, MotionConfig())[0]
        m = clip_motion(frames.times, frames.grey, MotionConfig(), sampled=True)
        if m.camera is None:
            print(f"{rel:42s} {label:8s} (too short)")
            continue
        print(f"{rel:42s} {label:8s} {m.camera:6.2f} {m.pan_x:7.2f} {m.pan_y:7.2f} {m.zoom:7.2f} {m.roll:6.2f}  "
              f"{name(m)}   ({what})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
