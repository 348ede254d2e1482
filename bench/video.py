"""The video path end to end on ../shared/data/videos (skipped when absent).

    python bench/video.py [--models]

1. ``winnow curate`` on the whole folder (a local Ray on this machine's cores): per-stage
   worker time, frames/s and videos/s, the run's wall time, and the funnel. ``--models`` adds
   the frame stages (RapidOCR, tiny CLIP, random aesthetic head) to the clips + motion run.
2. Cut detection F1 and speed against PySceneDetect's ContentDetector (``bench/video_cuts.py``).
3. Motion score per labelled video (``bench/video_motion.py``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
# this file is bench/video.py: its own folder must not shadow the ``video`` package
sys.path = [ROOT] + [p for p in sys.path if os.path.abspath(p or ".") != BENCH]

VIDEOS = os.path.join(ROOT, "..", "shared", "data", "videos")


def curate_folder(models: bool) -> None:

    from pipeline.commands import curate
    from pipeline.commands import curate_spec as specmod

    stages = [{"name": "clips"}, {"name": "motion"}]
    if models:
        stages += [{"name": "ocr", "backend": "rapidocr", "max_side": 512},
                   {"name": "clip", "model": "winnow-tiny-clip"}, {"name": "aesthetic", "weights": "random"}]
    out = tempfile.mkdtemp(prefix="winnow-bench-video-")
    try:
        spec = specmod.parse({"input": {"path": VIDEOS, "format": "videos"},
                              "output": {"path": out, "videos_per_shard": 8}, "stages": stages})
        t = time.perf_counter()
        result = curate.run(spec, log=None)
        wall = time.perf_counter() - t
        from pipeline.contract import layout

        videos = layout.read_videos(out).to_pandas()
        clips = layout.read_annotations(out).to_pandas()
        src_frames = int(videos["num_frames"].fillna(0).sum())
        src_seconds = float(videos["duration_s"].fillna(0).sum())
        clip_frames = int(clips.loc[clips["status"] == "kept", "num_frames"].fillna(0).sum())
        print(f"curate: {len(videos)} videos, {src_seconds:.0f} s of video, {src_frames} frames -> "
              f"{result.kept} clips kept ({clip_frames} frames), {result.rejected} segments rejected")
        print(f"  funnel: {json.dumps(result.videos)}")
        print(f"  wall {wall:.1f} s: {len(videos) / wall:.2f} videos/s, {src_frames / wall:.0f} source frames/s, "
              f"{src_seconds / wall:.1f} s of video per s; annotate phase {result.phases.get('annotate', 0):.1f} s")
        print("  stage          worker s   frames/s per worker   videos/s per worker")
        for stage, secs in result.stage_seconds.items():
            frames = src_frames if stage in ("probe", "clips") else clip_frames
            print(f"  {stage:<12} {secs:9.2f}   {frames / secs:19.0f}   {len(videos) / secs:19.2f}")
    finally:
        shutil.rmtree(out, ignore_errors=True)


def lvd_720p(real_size: bool, keep_all: bool) -> None:
    """jobs/lvd_video_curation.yaml's stages on the 720p files of ../shared/data/videos: hours of
    video per core-hour for each stage and the whole chain, and the bottleneck. Model stages run
    on random weights: at their real sizes (ViT-L-14 CLIP; EasyOCR as the job says) with
    ``real_size``, else the tiny presets; the caption stage always on the tiny presets (its real
    sizes per clip are bench/captions.py's). ``keep_all`` drops the job's thresholds and its semantic
    dedup, so every clip reaches every stage (the worst case per hour of video)."""
    import yaml

    from pipeline.commands import curate
    from pipeline.commands import curate_spec as specmod
    from pipeline.contract import layout
    from video.probe import probe

    folder = tempfile.mkdtemp(prefix="winnow-bench-lvd-in-")
    out = tempfile.mkdtemp(prefix="winnow-bench-lvd-")
    try:
        picked = []
        for d, _, files in os.walk(VIDEOS):
            for f in sorted(files):
                try:
                    info = probe(os.path.join(d, f))
                except Exception:  # noqa: BLE001 - not a video
                    continue
                if min(info.display_width, info.display_height) == 720:
                    shutil.copy(os.path.join(d, f), os.path.join(folder, f))
                    picked.append((f, info.duration_s))
        seconds = sum(d for _, d in picked)
        print(f"720p files: {len(picked)}, {seconds:.1f} s of video: {', '.join(f for f, _ in picked)}")
        job = yaml.safe_load(open(os.path.join(ROOT, "jobs", "lvd_video_curation.yaml")))
        if keep_all:        # random embeddings all look alike: semantic dedup would keep one clip
            job["stages"] = [st for st in job["stages"] if st["name"] != "semantic_dedup"]
        for st in job["stages"]:
            if keep_all:
                for k in ("min_camera", "min_subject", "max_area_ratio"):
                    st.pop(k, None)
            if st["name"] == "clip":
                st.update(pretrained="random") if real_size else st.update(model="winnow-tiny-clip",
                                                                           pretrained="random")
            elif st["name"] == "aesthetic":
                st["weights"] = "random"
            elif st["name"] == "ocr" and not real_size:
                st["backend"] = "rapidocr"
            elif st["name"] == "caption":
                st.update(coca_model="winnow-tiny-coca", coca_pretrained="random", vlm_model="winnow-tiny-vlm",
                          summary_model="winnow-tiny-summary")
        job["input"]["path"], job["output"]["path"] = folder, out
        spec = specmod.parse(job)
        print("stages: " + ", ".join(f"{e.name}" for e in spec.stages)
              + ("; model stages at real sizes, random weights" if real_size else "; model stages tiny")
              + ("; no thresholds, no dedup (every clip reaches every stage)" if keep_all
                 else "; the job's thresholds"))
        t = time.perf_counter()
        result = curate.run(spec, log=None)
        wall = time.perf_counter() - t
        clips = layout.read_annotations(out).to_pandas()
        kept = int((clips["status"] == "kept").sum())
        print(f"curate: {len(picked)} videos -> {len(clips)} segments, {kept} clips kept; wall {wall:.1f} s "
              f"({seconds / wall:.2f} s of video per s on {os.cpu_count()} cores)")
        total = sum(result.stage_seconds.values())
        print("  stage          worker s   h of 720p video per core-hour   share")
        for stage, secs in sorted(result.stage_seconds.items(), key=lambda kv: -kv[1]):
            print(f"  {stage:<12} {secs:9.2f}   {seconds / secs:28.1f}   {secs / total:6.1%}")
        print(f"  {'all stages':<12} {total:9.2f}   {seconds / total:28.1f}")
        print(f"  wall, whole run: {seconds / (wall * (os.cpu_count() or 1)):.2f} h of video per core-hour "
              f"(planning, Ray start, reduce and shard writing included); bottleneck: "
              f"{max(result.stage_seconds, key=result.stage_seconds.get)}")
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", action="store_true", help="add the OCR / CLIP / aesthetic frame stages")
    parser.add_argument("--lvd", action="store_true", help="only: the LVD job's stages on the 720p files, hours of "
                        "video per core-hour per stage")
    parser.add_argument("--real-size", action="store_true", help="with --lvd: ViT-L-14 and EasyOCR (random "
                        "weights) instead of the tiny presets")
    parser.add_argument("--keep-all", action="store_true", help="with --lvd: drop the job's thresholds")
    args = parser.parse_args()
    if not os.path.isdir(VIDEOS):
        print(f"skipped: {VIDEOS} not found")
        return 0
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    print(f"machine: {os.cpu_count()} cores\n")
    if args.lvd:
        lvd_720p(args.real_size, args.keep_all)
        return 0
    curate_folder(args.models)
    import importlib.util

    def load(name):
        spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    video_cuts, video_motion = load("video_cuts"), load("video_motion")

    print("\ncut detection vs PySceneDetect (bench/video_cuts.py)")
    video_cuts.main()
    print("\nmotion score per labelled video (bench/video_motion.py)")
    video_motion.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
