"""Cut detection against ground truth: winnow's cascade vs PySceneDetect's ContentDetector.

    python bench/video_cuts.py            (needs ../shared/data/gt/cuts.csv; PySceneDetect via
                                           pip install --no-deps scenedetect)

For every video in cuts.csv, in one run: each detector's cuts, precision/recall/F1 at +-2
frames, and frames/s (decode included). Prints per-file rows and the micro-averaged totals.
"""
from __future__ import annotations

import csv
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from video.cuts import CutConfig, detect_cuts, f1_score, read_for_cuts  # noqa: E402
from video.transnet import available as transnet_available  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def winnow(path: str, detector: str = "cascade", verify: str = "none") -> tuple[list[int], int, float]:
    t = time.perf_counter()
    cfg = CutConfig(detector=detector, verify=verify)
    frames = read_for_cuts(path, cfg)
    cuts = detect_cuts(frames.times, frames.yuv, frames.fps, cfg)
    return cuts.frames, len(frames.times), time.perf_counter() - t


def pyscenedetect(path: str) -> tuple[list[int], float] | None:
    try:
        from scenedetect import ContentDetector, detect
    except ImportError:
        return None
    t = time.perf_counter()
    scenes = detect(path, ContentDetector())
    return [s[0].frame_num for s in scenes[1:]], time.perf_counter() - t


def rows_path_hint(gt_path: str) -> str:
    with open(gt_path, encoding="utf-8") as fh:
        return next(csv.DictReader(fh))["video"]


def main() -> int:
    gt_path = os.path.join(DATA, "gt", "cuts.csv")
    if not os.path.exists(gt_path):
        print(f"skipped: {gt_path} not found")
        return 0
    totals = {"winnow": [0, 0, 0, 0.0], "pyscenedetect": [0, 0, 0, 0.0], "transnetv2": [0, 0, 0, 0.0],
              "winnow+verify": [0, 0, 0, 0.0]}
    if transnet_available():
        winnow(os.path.join(DATA, rows_path_hint(gt_path)), "transnetv2")   # load the network once, untimed
    frames_total = 0
    with open(gt_path, encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        path = os.path.join(DATA, row["video"])
        truth = [int(x) for x in row["cut_frames"].split()]
        found, n, dt = winnow(path)
        frames_total += n
        results = {"winnow": (found, dt)}
        if transnet_available():
            tn_found, _, tn_dt = winnow(path, "transnetv2")
            results["transnetv2"] = (tn_found, tn_dt)
            v_found, _, v_dt = winnow(path, verify="transnetv2")
            results["winnow+verify"] = (v_found, v_dt)
        base = pyscenedetect(path)
        if base:
            results["pyscenedetect"] = base
        line = f"{row['video'][7:]:42s} {n:4d} fr  truth {truth}"
        for name, (cuts, secs) in results.items():
            _, recall, f1 = f1_score(cuts, truth)
            tp = round(recall * len(truth))
            t = totals[name]
            t[0], t[1], t[2], t[3] = t[0] + tp, t[1] + len(cuts), t[2] + len(truth), t[3] + secs
            line += f"\n    {name:15s} F1 {f1:4.2f}  {n / secs:6.0f} fr/s  cuts {cuts}"
        print(line)
    print(f"\n{len(rows)} videos, {frames_total} frames, tolerance +-2 frames")
    for name, (tp, found, truth, secs) in totals.items():
        if not secs:
            hint = "pip install --no-deps scenedetect" if name == "pyscenedetect" else "pip install 'winnow[transnet]'"
            print(f"  {name}: not run ({hint})")
            continue
        p, r = tp / max(found, 1), tp / max(truth, 1)
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        print(f"  {name:15s} precision {p:.3f}  recall {r:.3f}  F1 {f1:.3f}  {frames_total / secs:6.0f} frames/s")
    if totals["pyscenedetect"][3]:
        print(f"  speed: winnow {totals['pyscenedetect'][3] / totals['winnow'][3]:.2f}x PySceneDetect")
        if totals["transnetv2"][3]:
            print(f"         transnetv2 (winnow's decode + the network on CPU) "
                  f"{totals['pyscenedetect'][3] / totals['transnetv2'][3]:.2f}x PySceneDetect")
            print(f"         winnow + transnetv2 verifier (windows around candidates only) "
                  f"{totals['pyscenedetect'][3] / totals['winnow+verify'][3]:.2f}x PySceneDetect")
    return 0


if __name__ == "__main__":
    sys.exit(main())
