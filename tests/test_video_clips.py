"""Clip planning (cuts, fades, margins, lengths), windows and the clip encoder, without Ray."""
import io
import math

import av
import numpy as np
import pytest

from pipeline.synth import write_video
from video.clips import ClipsConfig, plan_segments, progress, window_bounds
from video.encode import ClipEncoder, output_size
from video.probe import probe


def segs(out):
    return [(round(s.start_s, 3), round(s.end_s, 3), s.frames, (s.reason or "").split(":")[0]) for s in out]


def test_segments_between_cuts_with_margins_and_max_length():
    times = np.arange(100) / 10.0                       # 10 s at 10 fps
    luma = np.full(100, 120.0)
    dark = np.zeros(100, bool)
    cfg = ClipsConfig(min_s=1.0, max_s=4.0, margin_s=0.2)
    out = plan_segments(times, luma, [30, 45], dark, math.inf, cfg)
    assert segs(out) == [
        (0.0, 2.8, 28, ""),             # video start: no margin; cut at 3.0: 0.2 s margin
        (3.2, 4.3, 11, ""),             # between two cuts: margins on both sides
        (4.7, 8.7, 40, ""),             # 4.7 .. 10.0 is 5.3 s: one clip of max_s ...
        (8.7, 10.0, 13, ""),            # ... and the 1.3 s rest, long enough to keep
    ]


def test_short_rests_and_shots_are_rejected_rows():
    times = np.arange(50) / 10.0
    out = plan_segments(times, np.full(50, 100.0), [8], np.zeros(50, bool), math.inf,
                        ClipsConfig(min_s=2.0, max_s=3.0, margin_s=0.0))
    assert segs(out) == [(0.0, 0.8, 8, "too_short"), (0.8, 3.8, 30, ""), (3.8, 5.0, 12, "too_short")]


def test_a_fade_through_black_splits_the_shot_and_its_ramp_is_trimmed():
    times = np.arange(60) / 10.0
    luma = np.full(60, 120.0)
    luma[25:30] = [90, 60, 30, 10, 5]                   # fade out, two black frames, fade in
    luma[30:35] = [8, 40, 70, 100, 118]
    dark = luma < 24
    out = plan_segments(times, luma, [], dark, math.inf, ClipsConfig(min_s=1.0, max_s=10.0, fade_ratio=0.6))
    # frames below 0.6 x 120 = 72 at either side of the black run are trimmed too
    assert segs(out) == [(0.0, 2.6, 26, ""), (3.3, 6.0, 27, "")]


def test_variable_frame_rate_boundaries_come_from_timestamps():
    times = np.concatenate([np.arange(20) * 0.1, 2.0 + np.arange(12) * 0.25])
    out = plan_segments(times, np.full(32, 100.0), [20], np.zeros(32, bool), math.inf,
                        ClipsConfig(min_s=1.0, max_s=10.0, margin_s=0.2))
    # the median step (0.1 s) closes each shot; the second shot's frames are 0.25 s apart
    assert segs(out) == [(0.0, 1.8, 18, ""), (2.2, 4.85, 11, "")]   # the encoder starts at the first frame >= 2.2


def test_window_bounds_fold_a_short_tail_into_the_last_window():
    assert window_bounds(30.0, 120.0) == [(0.0, math.inf)]
    assert window_bounds(250.0, 120.0) == [(0.0, 120.0), (120.0, math.inf)]     # 10 s tail < 30 s
    assert window_bounds(300.0, 120.0) == [(0.0, 120.0), (120.0, 240.0), (240.0, math.inf)]


def test_progress_knows_which_videos_are_complete():
    import pyarrow as pa

    rows = [("v1_0000_0000", "v1", 0, 2, 2), ("v1_0000_0001", "v1", 0, 2, 2), ("v1_0001_0000", "v1", 1, 2, 1),
            ("v2_0000_0000", "v2", 0, 1, 2)]                   # v2's window has one of its two rows
    table = pa.table({"key": [r[0] for r in rows], "video_key": [r[1] for r in rows], "partition": [0] * 4,
                      "window_index": [r[2] for r in rows], "num_windows": [r[3] for r in rows],
                      "window_rows": [r[4] for r in rows]})
    have, done = progress(table)
    assert done == {"v1"} and len(have) == 4


def test_output_size_is_even_capped_and_never_upscaled():
    assert output_size(1920, 1080, 1024) == (1024, 576)
    assert output_size(161, 97, 1024) == (160, 96)
    assert output_size(1080, 1920, 640) == (360, 640)


@pytest.mark.parametrize("rotation, corner", [(90, (0, 0)), (-90, (1, 1)), (180, (1, 0))])
def test_encoder_turns_rotated_video_upright(tmp_path, rotation, corner):
    """A white block in the coded frame's top-right corner lands where a player shows it."""
    frame = np.full((96, 160, 3), 40, np.uint8)
    frame[:24, -24:] = 255
    path = str(tmp_path / "r.mp4")
    write_video(path, [frame] * 6, fps=10, rotation=rotation)
    info = probe(path)
    w, h = output_size(info.display_width, info.display_height, 1024)
    with av.open(path) as c:
        stream = c.streams.video[0]
        enc = ClipEncoder(w, h, info.rotation, stream.time_base, 0.25)
        for f in c.decode(stream):
            enc.add(f, float(f.time))
        clip = enc.finish()
    assert (clip.width, clip.height, clip.num_frames) == ((96, 160, 6) if rotation % 180 else (160, 96, 6))
    with av.open(io.BytesIO(clip.data)) as c:
        rgb = next(c.decode(video=0)).to_ndarray(format="rgb24")
    h, w = rgb.shape[:2]
    quads = {(r, col): rgb[r * h // 2:(r + 1) * h // 2, col * w // 2:(col + 1) * w // 2].mean()
             for r in (0, 1) for col in (0, 1)}
    assert max(quads, key=quads.get) == corner
    assert len(clip.keyframes) == 3 and all(k[:2] == b"\xff\xd8" for k in clip.keyframes)
    assert clip.start_s == 0.0 and clip.end_s == pytest.approx(0.6)
