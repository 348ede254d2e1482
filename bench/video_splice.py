"""Cut detection on spliced videos with known cuts, per class, tuning half vs validation half:
winnow's detector against PySceneDetect's ContentDetector and AdaptiveDetector in the same run.

    python bench/video_splice.py [--per-class 3] [--seed 0] [--half both|tune|validate] [--keep DIR]

Shots come from the real footage in ../shared/data (the runs between ground-truth cuts, the
videos known to be one shot, and the photographs filmed by a slow virtual camera), split by
source into a tuning half and a validation half (``video.splice.split_groups``: no footage in
both). ``video/splice.py`` builds every class from each half's shots at random sizes (160x90 to
1280x720) and rates (15-60 fps); each video is encoded with x264 (crf 18, one thread, so every run
sees the same bytes) and every detector reads the file. A detected cut matches a true one within +-2
frames. Negative classes have no cuts:
their column counts false cuts per video. PySceneDetect: ``pip install --no-deps scenedetect``.
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
sys.path.insert(0, ROOT)

DATA = os.path.join(ROOT, "..", "shared", "data")
# footage that is not real camera or film material, or whose cuts are not known: not a shot source
NOT_SOURCES = ("counter.mp4", "fades.mp4", "mmcv/test.mp4", "delayed_start.mp4")
# one footage under two names: only the first is a source (a shot and its copy would make "cuts"
# that change nothing)
SAME_FOOTAGE = ("issue-134-rotate.mp4", "traffic_camera_vfr.mp4", "cockatoo_yuv420.mp4")
GROUPS = {"goldeneye-vfr-drop3.mp4": "goldeneye"}
# below this rate a source would be stretched by repeating frames (a 6 fps clip shown at 60 fps
# jumps every tenth frame): not what the classes test
MIN_SOURCE_FPS = 12.0
# frames known to be damaged inside a one-shot video (codec glitches): dropped from the shot
DAMAGED = {"demo__demo.mp4": [(224, 232), (262, 272)]}


def load_shots(width: int = 320):
    from video.splice import decode_rgb, shots_between_cuts, still_shot

    shots = []
    known = {}
    with open(os.path.join(DATA, "gt", "cuts.csv"), encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            known[row["video"]] = [int(c) for c in row["cut_frames"].split()]
    single = [os.path.relpath(p, DATA) for p in glob.glob(os.path.join(DATA, "videos", "**", "*.mp4"), recursive=True)
              if os.path.basename(os.path.dirname(p)) in ("mmaction2", "imageio", "dvrscan")]
    for rel in sorted(set(known) | set(single)):
        path = os.path.join(DATA, rel)
        base = os.path.basename(rel)
        if not os.path.exists(path) or any(rel.endswith(n) for n in NOT_SOURCES) or base in SAME_FOOTAGE:
            continue
        group = GROUPS.get(base, os.path.splitext(base)[0])
        frames, fps = decode_rgb(path, width)
        if fps < MIN_SOURCE_FPS:
            continue
        found = shots_between_cuts(frames, fps, known.get(rel, []), group, rel, damaged=tuple(DAMAGED.get(base, ())))
        if base in DAMAGED:                  # one take cut apart by its damage: its pieces are not different shots
            found = sorted(found, key=lambda s: -len(s.frames))[:1]
        shots += found
    rng = np.random.default_rng(0)
    from PIL import Image

    for p in sorted(glob.glob(os.path.join(DATA, "images", "**", "*.*"), recursive=True)):
        if os.path.splitext(p)[1].lower() not in (".jpg", ".jpeg", ".png"):
            continue
        try:
            with Image.open(p) as im:
                if im.width * im.height > 40e6 or min(im.size) < 200 or not 0.5 < im.width / im.height < 2.5:
                    continue
                im.draft("RGB", (1024, 1024))
                arr = np.asarray(im.convert("RGB").resize((640, round(640 * im.height / im.width))))
        except OSError:
            continue
        name = os.path.relpath(p, DATA)
        shots.append(still_shot(arr, float(rng.uniform(2.0, 4.0)), 25.0, rng, f"photo:{name}", name, width))
    return shots


def winnow(path: str, overrides: dict | None = None) -> list[int]:
    from video.cuts import CutConfig, detect_cuts, read_for_cuts

    cfg = CutConfig(**(overrides or {}))
    f = read_for_cuts(path, cfg)
    return detect_cuts(f.times, f.yuv, f.fps, cfg).frames


def pyscenedetect(path: str, kind: str) -> list[int] | None:
    try:
        import scenedetect
    except ImportError:
        return None
    det = {"content": scenedetect.ContentDetector, "adaptive": scenedetect.AdaptiveDetector}[kind]()
    return [s[0].frame_num for s in scenedetect.detect(path, det)[1:]]


def score(found: list[int], truth: list[int], tol: int = 2) -> tuple[int, int, int]:
    """(true positives, false positives, false negatives), each true cut matched at most once."""
    left, tp = sorted(truth), 0
    for f in sorted(found):
        m = next((t for t in left if abs(t - f) <= tol), None)
        if m is not None:
            left.remove(m)
            tp += 1
    return tp, len(found) - tp, len(left)


def f1(tp: int, fp: int, fn: int) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0


def run_half(name: str, shots, per_class: int, seed: int, keep: str | None, detectors, verbose=False) -> dict:
    from pipeline.synth import write_video
    from video.splice import CLASSES, build_set

    videos = build_set(shots, per_class, seed)
    folder = keep or tempfile.mkdtemp(prefix="winnow-splice-")
    os.makedirs(folder, exist_ok=True)
    totals = {}
    for v in videos:
        path = os.path.join(folder, f"{name}_{v.name}.mp4")
        write_video(path, v.frames, fps=v.fps, crf=18, repeatable=True)
        if keep:
            with open(path[:-4] + ".json", "w") as fh:
                json.dump({"cuts": v.cuts, "fps": v.fps, "groups": v.groups, "class": v.klass}, fh)
        for det, fn in detectors.items():
            t = time.perf_counter()
            found = fn(path)
            if found is None:
                continue
            row = totals.setdefault((v.klass, det), [0, 0, 0, 0, 0.0])
            tp, fp, fnn = score(found, v.cuts)
            if verbose and (fp or fnn):
                print(f"    {det:<24} {v.name}: found {found}, truth {v.cuts} ({', '.join(v.groups)})")
            row[0] += tp
            row[1] += fp
            row[2] += fnn
            row[3] += 1
            row[4] += time.perf_counter() - t
        if not keep:
            os.remove(path)
    print(f"\n{name} half: {len(shots)} shots from {len({s.group for s in shots})} sources, {len(videos)} videos")
    dets = [d for d in detectors if any((k, d) in totals for k in CLASSES)]
    print(f"  {'class':<19}" + "".join(f"{d:>25}" for d in dets))
    for k in CLASSES:
        cells = []
        for d in dets:
            tp, fp, fn, n, _ = totals.get((k, d), [0, 0, 0, 0, 0.0])
            cells.append(
                f"F1 {f1(tp, fp, fn):.3f} ({tp}/{tp + fn}, {fp} fp)" if tp + fn else f"{fp / max(n, 1):.2f} false/video"
            )
        print(f"  {k:<19}" + "".join(f"{c:>25}" for c in cells))
    for d in dets:
        tp = sum(totals[(k, d)][0] for k in CLASSES if (k, d) in totals)
        fp = sum(totals[(k, d)][1] for k in CLASSES if (k, d) in totals)
        fn = sum(totals[(k, d)][2] for k in CLASSES if (k, d) in totals)
        print(f"  all classes {d:<24} F1 {f1(tp, fp, fn):.3f}  precision {tp / max(tp + fp, 1):.3f}  "
              f"recall {tp / max(tp + fn, 1):.3f}")
    return totals


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-class", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--half", choices=["both", "tune", "validate"], default="both")
    ap.add_argument("--keep", help="write the spliced videos here (and keep them, with their cuts in a .json each)")
    ap.add_argument("--verbose", action="store_true", help="print every video a detector gets wrong")
    ap.add_argument("--set", action="append", default=[],
                    help="also run winnow with this CutConfig change (e.g. rates=[0]) on the same videos")
    args = ap.parse_args()
    import yaml

    overrides = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    if not os.path.isdir(os.path.join(DATA, "videos")):
        print(f"skipped: {os.path.join(DATA, 'videos')} not found")
        return 0
    from video.splice import split_groups

    shots = load_shots()
    tune, validate = split_groups([s.group for s in shots])
    print("tuning sources:    " + ", ".join(sorted(tune)))
    print("validation sources: " + ", ".join(sorted(validate)))
    detectors = {"winnow": winnow, **({"winnow --set": lambda p: winnow(p, overrides)} if overrides else {}),
                 "pyscenedetect-content": lambda p: pyscenedetect(p, "content"),
                 "pyscenedetect-adaptive": lambda p: pyscenedetect(p, "adaptive")}
    for half, groups, seed in (("tune", tune, args.seed), ("validate", validate, args.seed + 1)):
        if args.half in ("both", half):
            run_half(half, [s for s in shots if s.group in groups], args.per_class, seed,
                     args.keep and os.path.join(args.keep, half), detectors, args.verbose)
    return 0


if __name__ == "__main__":
    sys.exit(main())
