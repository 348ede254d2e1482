"""Motion per labelled video of ../shared/data/videos: static vs moving, with DIS and Farneback flow
in the same run, each split into camera and subject motion.

    python bench/video_motion.py [--per-class 8] [--seed 0]

Each file is labelled static (a fixed camera, even with cars passing or the light changing; flat
frames) or moving (handheld, panning, action). Per file and flow method: ``motion_score`` (the
mean), ``camera_motion`` and ``subject_motion`` (% of frame width per second, 2 fps samples of
160-px grey frames) and speed; then, per column and method, the AUC of static vs moving (1.0: one
threshold separates them all) and the range of thresholds that does. Then generated clips
(``pipeline.synth.camera_move`` over the photographs, ``cartoon``) at random sizes and rates: fixed
cameras (a still, a subject crossing, a light change, a talking cel animation) against moving ones
(pans, zooms, handheld), split by photo into a half that picks the threshold and a half that
reports it. Speeds are
seconds of video per second of work, on whatever cores the process gets (pin it with taskset for one).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from video.motion import MotionConfig, clip_motion, read_for_motion  # noqa: E402

VIDEOS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "videos")
LABELLED = [("dvrscan/traffic_camera.mp4", "static", "fixed camera, cars passing"),
            ("dvrscan/issue53_brightness_change.avi", "static", "fixed camera, light changes"),
            ("pyscenedetect/fades.mp4", "static", "flat frames fading"),
            ("imageio/cockatoo.mp4", "moving", "handheld, fast camera motion"),
            ("imageio/realshort.mp4", "moving", "handheld"),
            ("mmaction2/demo__demo.mp4", "moving", "shaky action clip"),
            ("mmaction2/tests__data__test.mp4", "moving", "action clip")]


def handoff(path: str, cfg: MotionConfig) -> tuple[object, float, float]:
    """The frames the clips stage hands the motion stage (``FrameSampler`` fed the upright frames
    it encodes, at ``max_side`` 1024), without the encoding itself: (frames, seconds spent
    sampling -- motion's share of the clips stage's work --, seconds spent decoding and scaling)."""
    from types import SimpleNamespace

    from pipeline.contract.media import open_video
    from video.encode import ClipEncoder, output_size
    from video.frames import frames_between
    from video.probe import probe

    info = probe(path)
    w, h = output_size(info.display_width, info.display_height, 1024)
    sampling = work = 0.0
    with open_video(path) as container:
        stream = container.streams.video[0]
        enc = ClipEncoder(w, h, info.rotation, stream.time_base, 0.0, motion=(cfg.rate, cfg.width))
        t = time.perf_counter()
        for frame in frames_between(container, stream):
            if frame.time is None:
                continue
            out = enc._upright(frame)
            s = time.perf_counter()
            enc.sample(out, float(frame.time))
            sampling += time.perf_counter() - s
        work = time.perf_counter() - t - sampling
        enc.container.close()
    import numpy as np

    return SimpleNamespace(times=np.asarray(enc.sampler.times), grey=np.stack(enc.sampler.grey)), sampling, work


def auc(static: list[float], moving: list[float]) -> float:
    """P(a moving clip scores above a static one), ties half."""
    pairs = [(m > s) + 0.5 * (m == s) for s in static for m in moving]
    return sum(pairs) / len(pairs) if pairs else float("nan")


# generated clips: what the camera does (label) and how the picture moves, in % of frame width per second
# (a zoom of z % of scale per second moves a pixel at the frame's mean distance from the centre,
# about 0.38 of the width, by 0.38 z: the zoom class moves the picture by 3-9.5 %/s as the pans do)
GENERATED = [("still photo", "static", {}),
             ("photo, subject crossing", "static", {"subject": True}),
             ("photo, light change", "static", {"light": True}),
             ("cel animation on twos, talking", "static", {"cartoon": True}),
             ("slow pan 3-6 %/s", "moving", {"pan": (3, 6)}),
             ("pan 6-30 %/s", "moving", {"pan": (6, 30)}),
             ("zoom 8-25 %/s of scale", "moving", {"zoom": (8, 25)}),
             ("handheld 3-15 %/s", "moving", {"shake": (3, 15)})]
STATIC_CAMERA = 1.3     # the middle of the tuning half's gap (0.62, 2.00) at --per-class 8, seed 0
SIZES = [(160, 90), (320, 180), (640, 360), (1280, 720), (360, 640), (480, 480)]
RATES = [15.0, 24.0, 30.0, 60.0]
FRAMES = "handoff"      # --frames


def frames_size(path: str) -> tuple[int, int]:
    from video.probe import probe

    info = probe(path)
    return info.display_width, info.display_height


def generated_clip(kind: dict, image, rng, folder: str, k: int) -> tuple[str, str]:
    """One clip of ``kind`` over ``image`` at a random size and rate, written as H.264."""
    import numpy as np

    from pipeline.synth import camera_move, cartoon, write_video

    w, h = SIZES[rng.integers(len(SIZES))]
    fps = float(RATES[rng.integers(len(RATES))])
    n = int(4 * fps)
    seed = int(rng.integers(1 << 30))
    if kind.get("cartoon"):
        frames = cartoon(n, w, h, fps, seed)
    else:
        lo_hi = lambda key: float(rng.uniform(*kind[key])) if key in kind else 0.0  # noqa: E731
        frames = camera_move(image, n, w, h, fps, seed, pan=lo_hi("pan"), zoom=lo_hi("zoom") * rng.choice([-1, 1]),
                             shake=lo_hi("shake"), angle_deg=float(rng.uniform(0, 360)))
        if kind.get("subject"):                     # a patch of another part of the picture crossing the frame
            side = max(8, h // 4)
            patch = np.ascontiguousarray(frames[0][:side, :side][::-1, ::-1])
            speed = rng.uniform(10, 40) / 100 * w / fps
            for i, f in enumerate(frames):
                x = int(i * speed) % max(1, w - side)
                f[h // 3:h // 3 + side, x:x + side] = patch
        if kind.get("light"):
            gain = 1 + 0.5 * np.sin(np.linspace(0, np.pi, n))
            frames = [np.clip(f * g, 0, 255).astype(np.uint8) for f, g in zip(frames, gain, strict=True)]
    path = os.path.join(folder, f"gen{k}.mp4")
    write_video(path, frames, fps=fps, crf=20, repeatable=True)
    return path, f"{w}x{h}@{fps:g}"


def generated(per_class: int, seed: int) -> list[tuple[str, str, str, object]]:
    """(class, label, size@rate, Motion) for ``per_class`` generated clips of each class, over the
    photographs of ../shared/data/images (split by photo as the splice bench splits its sources:
    the first half's rows are for choosing a threshold, the second's for reporting it)."""
    import shutil
    import tempfile

    import numpy as np
    from PIL import Image

    from video.splice import split_groups

    images = os.path.join(VIDEOS, "..", "images")
    photos = sorted(os.path.relpath(os.path.join(d, f), images) for d, _, fs in os.walk(images) for f in fs
                    if f.lower().endswith((".jpg", ".png")))
    _, validate = split_groups([f"photo:images/{p}" for p in photos])
    rng = np.random.default_rng(seed)
    folder = tempfile.mkdtemp(prefix="winnow-motion-")
    out = []
    try:
        for name, label, kind in GENERATED:
            for k in range(per_class):
                photo = photos[rng.integers(len(photos))]
                img = Image.open(os.path.join(images, photo)).convert("RGB")
                if min(img.size) < 200:
                    img = img.resize((img.width * 400 // min(img.size), img.height * 400 // min(img.size)))
                path, where = generated_clip(kind, np.asarray(img), rng, folder, len(out))
                if FRAMES == "handoff":
                    frames = handoff(path, MotionConfig())[0]
                    m = clip_motion(frames.times, frames.grey, MotionConfig(), sampled=True)
                else:
                    frames = read_for_motion(path)
                    m = clip_motion(frames.times, frames.yuv[..., 0], MotionConfig())
                half = "validate" if f"photo:images/{photo}" in validate or kind.get("cartoon") and k % 2 else "tune"
                out.append((name, label, where, half, m))
                os.remove(path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-class", type=int, default=8, help="generated clips per class")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--frames", choices=("handoff", "decode"), default="handoff",
                    help="where the scored frames come from: the clips stage's (what a curate run does) or the "
                         "motion stage's own decode of the file (fast_decode)")
    args = ap.parse_args()
    global FRAMES
    FRAMES = args.frames
    if not os.path.isdir(VIDEOS):
        print(f"skipped: {VIDEOS} not found")
        return 0
    rows = []
    for name, label, what in LABELLED:
        path = os.path.join(VIDEOS, name)
        if not os.path.exists(path):
            continue
        for method in ("dis", "farneback"):
            cfg = MotionConfig(method=method)
            t = time.perf_counter()
            frames = read_for_motion(path, cfg)
            t_flow = time.perf_counter()
            m_dec = clip_motion(frames.times, frames.yuv[..., 0], cfg)
            dt, dt_all = time.perf_counter() - t_flow, time.perf_counter() - t
            seconds = float(frames.times[-1] - frames.times[0]) if len(frames.times) > 1 else 0.0
            small, sampling, _ = handoff(path, cfg)
            t = time.perf_counter()
            m_hand = clip_motion(small.times, small.grey, cfg, sampled=True)
            dt_hand = time.perf_counter() - t + sampling
            m = m_hand if FRAMES == "handoff" else m_dec
            rows.append((name, label, method, m))
            size = "x".join(map(str, frames_size(path)))
            print(f"{name:38s} {size:>9s} {label:7s} {method:9s} motion {m.score:6.2f}  camera {m.camera:6.2f}  "
                  f"subject {m.subject:6.2f}  ({len(m.pairs)} pairs; {what})")
            print(f"{'':48s} real time: flow {seconds / dt:4.0f}x; own decode (fast_decode) {seconds / dt_all:4.0f}x; "
                  f"clips' frames handed over {seconds / dt_hand:4.0f}x (sampling {1e3 * sampling:.0f} ms)  "
                  f"[decoded: camera {m_dec.camera:6.2f} subject {m_dec.subject:6.2f}; "
                  f"handed: camera {m_hand.camera:6.2f} subject {m_hand.subject:6.2f}]")
    print()
    for method in ("dis", "farneback"):
        for col in ("score", "camera", "subject"):
            st = [getattr(m, col) for _, lab, me, m in rows if me == method and lab == "static"]
            mv = [getattr(m, col) for _, lab, me, m in rows if me == method and lab == "moving"]
            gap = (
                f"thresholds in ({max(st):.2f}, {min(mv):.2f}) separate them"
                if min(mv) > max(st)
                else "no threshold separates them"
            )
            print(f"  {method:9s} {col:8s} AUC static vs moving {auc(st, mv):.3f}; {gap}")
    print(f"\ngenerated clips (DIS, frames: {FRAMES}, {args.per_class} per class, sizes {len(SIZES)}, rates {RATES}):")
    gen = generated(args.per_class, args.seed)
    for name, label, _ in GENERATED:
        ms = [m for n, _, _, _, m in gen if n == name]
        print(f"  {name:32s} {label:7s} camera {min(m.camera for m in ms):6.2f}-{max(m.camera for m in ms):6.2f}  "
              f"subject {min(m.subject for m in ms):6.2f}-{max(m.subject for m in ms):6.2f}  "
              f"motion {min(m.score for m in ms):6.2f}-{max(m.score for m in ms):6.2f}")
    static_camera = STATIC_CAMERA
    wrong = [(n, w, round(m.camera, 2)) for n, lab, w, h, m in gen
             if h == "validate" and (m.camera >= static_camera) != (lab == "moving")]
    wrong_real = [(n, round(m.camera, 2)) for n, lab, me, m in rows
                  if me == "dis" and (m.camera >= static_camera) != (lab == "moving")]
    print(
        f"  camera_motion >= {static_camera:g} %/s as 'the camera moves' (chosen on the tuning half's gap): "
        f"{len(wrong)} wrong of {sum(h == 'validate' for *_, h, _ in gen)} validation clips {wrong or ''}, "
        f"{len(wrong_real)} wrong of {sum(me == 'dis' for _, _, me, _ in rows)} labelled real clips {wrong_real or ''}"
    )
    for col in ("score", "camera", "subject"):
        for half in ("tune", "validate"):
            st = [getattr(m, col) for _, lab, _, h, m in gen if lab == "static" and h == half]
            mv = [getattr(m, col) for _, lab, _, h, m in gen if lab == "moving" and h == half]
            gap = (
                f"thresholds in ({max(st):.2f}, {min(mv):.2f}) separate them"
                if min(mv) > max(st)
                else "no threshold separates them"
            )
            print(f"  {col:8s} {half:8s} AUC static vs moving {auc(st, mv):.3f} ({len(st)} vs {len(mv)}); {gap}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
