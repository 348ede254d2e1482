"""Motion score: static < panning, in % of frame width per second, sampled by timestamp."""
import io

import numpy as np
import pytest

from pipeline.synth import shot, write_video
from video.frames import read_small
from video.motion import motion_score, sample_indices


@pytest.mark.parametrize("motion, expected", [(0.0, 0.0), (1.0, 6.25), (3.0, 18.75)])
def test_pan_speed_in_percent_of_width_per_second(tmp_path, motion, expected):
    # a pan of `motion` px/frame at 10 fps on a 160-px-wide frame = motion * 10 / 160 * 100 %/s
    write_video(str(tmp_path / "v.mp4"), shot(30, 160, 96, seed=1, motion=motion), fps=10)
    frames = read_small(str(tmp_path / "v.mp4"), width=160)
    score, pairs = motion_score(frames.times, frames.yuv[..., 0])
    assert len(pairs) == 5                               # 2.9 s at 2 fps: 6 samples, 5 pairs
    assert score == pytest.approx(expected, abs=max(0.8, 0.05 * expected))


def test_score_does_not_depend_on_resolution(tmp_path):
    write_video(str(tmp_path / "v.mp4"), shot(30, 320, 192, seed=2, motion=4.0), fps=10)
    small = read_small(str(tmp_path / "v.mp4"), width=160)
    large = read_small(str(tmp_path / "v.mp4"), width=320)
    a = motion_score(small.times, small.yuv[..., 0])[0]
    b = motion_score(large.times, large.yuv[..., 0])[0]
    assert a == pytest.approx(12.5, rel=0.08) and b == pytest.approx(12.5, rel=0.08)


def test_samples_follow_timestamps_not_frame_counts():
    times = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 1.0, 1.5, 2.0])     # 10 fps, then 2 fps
    assert sample_indices(times, 2.0).tolist() == [0, 5, 6, 7, 8]
    assert motion_score(np.array([0.0]), np.zeros((1, 8, 8), np.uint8)) == (None, [])


def test_a_pan_is_camera_motion_and_a_walker_before_a_still_camera_is_subject_motion(tmp_path):
    from video.motion import clip_motion

    write_video(str(tmp_path / "pan.mp4"), shot(30, 160, 96, seed=3, motion=2.0), fps=10)
    pan = read_small(str(tmp_path / "pan.mp4"), width=160)
    m = clip_motion(pan.times, pan.yuv[..., 0])
    # 2 px/frame at 10 fps; the residual's top tenth on a pan is the picture's entering edge
    assert m.camera == pytest.approx(12.5, rel=0.1) and m.subject < 0.25 * m.camera
    # a static background with a textured square crossing it at 4 px/frame
    background = shot(1, 160, 96, seed=4)[0]
    square = shot(1, 24, 24, seed=5)[0]
    frames = []
    for i in range(30):
        f = background.copy()
        f[36:60, 10 + 4 * i:34 + 4 * i] = square
        frames.append(f)
    write_video(str(tmp_path / "walker.mp4"), frames, fps=10)
    walker = read_small(str(tmp_path / "walker.mp4"), width=160)
    w = clip_motion(walker.times, walker.yuv[..., 0])
    assert w.subject > 3 * w.camera and w.camera < 1.0     # measured: 4.3 vs 0.28
    assert w.score == pytest.approx(motion_score(walker.times, walker.yuv[..., 0])[0])


def _camera_and_subject(tmp_path, frames, fps):
    from video.motion import clip_motion

    write_video(str(tmp_path / "g.mp4"), frames, fps=fps, crf=20)
    small = read_small(str(tmp_path / "g.mp4"), width=160)
    m = clip_motion(small.times, small.yuv[..., 0])
    return m.camera, m.subject


@pytest.mark.parametrize("size, fps", [((320, 180), 15.0), ((180, 320), 30.0)])
def test_generated_camera_moves_read_their_speed_at_any_size_and_rate(tmp_path, size, fps):
    from pipeline.synth import camera_move

    image = np.concatenate(shot(1, 640, 480, seed=21), axis=0)
    pan, _ = _camera_and_subject(tmp_path, camera_move(image, int(3 * fps), *size, fps, 1, pan=10.0), fps)
    still, _ = _camera_and_subject(tmp_path, camera_move(image, int(3 * fps), *size, fps, 1), fps)
    assert pan == pytest.approx(10.0, rel=0.12) and still < 0.1


def test_near_static_animation_has_a_fixed_camera(tmp_path):
    # flat cel shapes on twos with line boil and a talking face: the camera reads as fixed
    from pipeline.synth import cartoon

    camera, subject = _camera_and_subject(tmp_path, cartoon(60, 320, 180, 24.0, seed=3), 24.0)
    assert camera < 1.3 and subject > camera


def test_the_stage_rejects_fixed_camera_clips_unless_the_subject_moves():
    from pipeline.contract.config import ConfigError
    from pipeline.contract.schema import IMAGE, IMAGE_EXT, KEPT, KEY, REJECT_REASON, STATUS
    from video.motion import MotionScore, MotionStageConfig

    def run(frames, **cfg):
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            write_video(f"{d}/c.mp4", frames, fps=10)
            data = open(f"{d}/c.mp4", "rb").read()
        batch = {KEY: np.array(["k"], object), IMAGE: np.array([data], object), IMAGE_EXT: np.array(["mp4"], object),
                 STATUS: np.array([KEPT], object), REJECT_REASON: np.array([None], object)}
        out = MotionScore(MotionStageConfig(**cfg))(batch)
        return out[STATUS][0], out[REJECT_REASON][0]

    still = shot(30, 160, 96, seed=4)
    assert run(still, min_camera=1.3) == ("rejected", "static: camera_motion 0.00 < 1.3")
    assert run(shot(30, 160, 96, seed=4, motion=2.0), min_camera=1.3) == (KEPT, None)       # 12.5 %/s
    with pytest.raises(ConfigError, match="min_subject: only applies to fixed-camera clips"):
        MotionScore.validate(MotionStageConfig(min_subject=4.0), "stages.motion", [("clips", None)])


@pytest.mark.parametrize("kind", ["constant", "jitter", "variable", "gaps"])
def test_the_clips_stage_sampler_picks_the_frames_sample_indices_picks(kind):
    from video.motion import FrameSampler

    rng = np.random.default_rng({"constant": 1, "jitter": 2, "variable": 3, "gaps": 4}[kind])
    for _ in range(20):
        fps = float(rng.uniform(5, 90))
        n = int(rng.integers(2, 200))
        steps = np.full(n, 1 / fps)
        if kind == "jitter":
            steps *= rng.uniform(0.5, 1.5, n)
        elif kind == "variable":
            steps = rng.choice([1 / 60, 1 / 24, 1 / 5, 0.5, 0.73], n)
        elif kind == "gaps":
            steps[rng.integers(0, n, 3)] = rng.uniform(0.3, 3.0, 3)
        times = float(rng.uniform(0, 100)) + np.concatenate([[0.0], np.cumsum(steps[:-1])])
        rate = float(rng.choice([0.5, 2.0, 3.0]))
        sampler = FrameSampler(rate, 8)
        for i, t in enumerate(times):                    # frame i's pixels hold i, to see which were kept
            sampler.add(float(t), np.full((6, 8), i % 256, np.uint8))
        kept = [int(g[0, 0]) for g in sampler.grey]
        assert kept == [i % 256 for i in sample_indices(times, rate)]
        assert sampler.times == [float(times[i]) for i in sample_indices(times, rate)]


def test_packed_frames_round_trip_and_refuse_foreign_or_truncated_bytes():
    from video.motion import pack_frames, unpack_frames

    grey = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    data = pack_frames(np.array([0.0, 0.5, 1.0]), grey, 2.0)
    times, back, rate = unpack_frames(data)
    assert times.tolist() == [0.0, 0.5, 1.0] and rate == 2.0 and np.array_equal(back, grey)
    for bad in (data[:-1], data[:10], b"", b"PK\x03\x04" + data[4:], data + b"\x00"):
        with pytest.raises(ValueError, match="motion frames"):
            unpack_frames(bad)


def test_the_motion_stage_reads_the_clips_stage_frames_instead_of_decoding(tmp_path):
    """A clip encoded with the sampler on: the motion stage scores the handed frames (the clip's
    bytes are never read: garbage here), the score matches a decode of the clip, and the in-flight
    column is gone after the stage. Frames of another width fall back to decoding."""
    import av

    from pipeline.contract.schema import IMAGE, IMAGE_EXT, KEPT, KEY, MOTION_FRAMES, MOTION_SCORE, REJECT_REASON, STATUS
    from video.encode import ClipEncoder
    from video.frames import frames_between
    from video.motion import MotionScore, MotionStageConfig, clip_motion, read_for_motion

    write_video(str(tmp_path / "v.mp4"), shot(40, 320, 192, seed=5, motion=3.0), fps=20)   # 18.75 %/s
    with av.open(str(tmp_path / "v.mp4")) as c:
        s = c.streams.video[0]
        enc = ClipEncoder(320, 192, 0, s.time_base, 1.0, motion=(2.0, 160))
        for f in frames_between(c, s):
            enc.add(f, float(f.time))
        clip = enc.finish()
    decoded = read_for_motion(io.BytesIO(clip.data))
    ref = clip_motion(decoded.times, decoded.yuv[..., 0]).score

    def run(packed, data, **cfg):
        batch = {KEY: np.array(["k"], object), IMAGE: np.array([data], object), IMAGE_EXT: np.array(["mp4"], object),
                 STATUS: np.array([KEPT], object), REJECT_REASON: np.array([None], object),
                 MOTION_FRAMES: np.array([packed], object)}
        out = MotionScore(MotionStageConfig(**cfg))(batch)
        assert MOTION_FRAMES not in out
        return out[STATUS][0], out[MOTION_SCORE][0]

    status, score = run(clip.motion_frames, b"not a video")
    assert status == KEPT and score == pytest.approx(18.75, rel=0.08) and score == pytest.approx(ref, rel=0.05)
    assert run(clip.motion_frames, b"not a video", width=128)[0] == "rejected"     # decoded: garbage
    assert run(clip.motion_frames, clip.data, width=128)[1] == pytest.approx(18.75, rel=0.08)
    assert run(None, clip.data)[1] == pytest.approx(18.75, rel=0.08)


def test_a_motion_stage_asks_the_clips_stage_for_its_frames():
    from pipeline.commands.curate_spec import parse

    spec = parse({"input": {"path": "/nonexistent/videos"}, "output": {"path": "/tmp/unused-out"},
                  "stages": [{"name": "clips"}, {"name": "motion", "rate": 3.0, "width": 128}]})
    assert spec.stages[0].config.motion_sample == [3.0, 128]
    alone = parse({"input": {"path": "/nonexistent/videos"}, "output": {"path": "/tmp/unused-out"},
                   "stages": [{"name": "clips"}]})
    assert alone.stages[0].config.motion_sample is None


def test_camera_of_names_exact_affine_fields_as_the_camera_moves():
    """Flow fields built from known moves (no optical flow): the columns read them back, signed as
    the camera's move. Frame 200 x 100 px; one pair."""
    from video.motion import affine_fit, camera_of

    w, h = 200, 100
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float64)
    cx, cy = gx - w / 2, gy - h / 2

    def field(dx, dy):
        return np.stack([dx, dy], axis=-1).astype(np.float32)

    cases = [
        (field(np.full_like(gx, 4.0), 0 * gx), (-2.0, 0.0, 0.0, 0.0)),      # picture moves right: the camera pans left
        (field(0 * gx, np.full_like(gx, -3.0)), (0.0, -1.5, 0.0, 0.0)),     # picture moves up: the camera tilts down
        (field(0.05 * cx, 0.05 * cy), (0.0, 0.0, 100 * np.log(1.05), 0.0)),  # the picture grows 5 %: zoom in
        # the picture turns 1 degree clockwise on screen (y down): the camera rolls anticlockwise
        (field(-np.radians(1.0) * cy, np.radians(1.0) * cx), (0.0, 0.0, 0.0, -1.0)),
    ]
    for flow, want in cases:
        got = camera_of(affine_fit(flow), w, h)
        np.testing.assert_allclose(got, want, atol=1e-9)


@pytest.mark.parametrize("size, fps", [((320, 180), 12.0), ((180, 320), 30.0), ((256, 256), 24.0)])
def test_generated_camera_moves_are_named_as_the_camera_moved(tmp_path, size, fps):
    from pipeline.synth import camera_move
    from video.motion import CameraMove, clip_motion

    image = np.concatenate(shot(1, 640, 480, seed=22), axis=0)
    moves = {"static": {}, "pan_right": dict(pan=9.0), "pan_left": dict(pan=9.0, angle_deg=180),
             "tilt_down": dict(pan=9.0, angle_deg=90), "tilt_up": dict(pan=9.0, angle_deg=270),
             "zoom_in": dict(zoom=14.0), "zoom_out": dict(zoom=-14.0), "complex": dict(pan=9.0, angle_deg=45)}
    name = CameraMove()
    got = {}
    for move, kw in moves.items():
        write_video(str(tmp_path / "g.mp4"), camera_move(image, int(2.5 * fps), *size, fps, 3, **kw), fps=fps, crf=20)
        small = read_small(str(tmp_path / "g.mp4"), width=160)
        m = clip_motion(small.times, small.yuv[..., 0])
        got[move] = name(m)
        if move.startswith(("pan", "tilt")):                       # 9 % of the width per second, signed
            assert abs(m.pan_x if move.startswith("pan") else m.pan_y) == pytest.approx(9.0, rel=0.12)
    assert got == {m: m for m in moves}


def test_the_stage_writes_the_camera_columns():
    from pipeline.contract.schema import (
        CAMERA_MOVE,
        CAMERA_PAN_X,
        CAMERA_PAN_Y,
        CAMERA_ROLL,
        CAMERA_ZOOM,
        IMAGE,
        IMAGE_EXT,
        KEPT,
        KEY,
        REJECT_REASON,
        STATUS,
    )
    from pipeline.synth import camera_move
    from video.motion import MotionScore, MotionStageConfig

    image = np.concatenate(shot(1, 640, 480, seed=23), axis=0)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        write_video(f"{d}/a.mp4", camera_move(image, 30, 192, 108, 10.0, 1, pan=12.0, angle_deg=180), fps=10)
        write_video(f"{d}/b.mp4", camera_move(image, 30, 192, 108, 10.0, 1), fps=10)
        data = [open(f"{d}/{n}.mp4", "rb").read() for n in "ab"]
    batch = {KEY: np.array(["a", "b", "c"], object), IMAGE: np.array(data + [b"not a video"], object),
             IMAGE_EXT: np.array(["mp4"] * 3, object), STATUS: np.array([KEPT] * 3, object),
             REJECT_REASON: np.array([None] * 3, object)}
    out = MotionScore(MotionStageConfig())(batch)
    assert out[CAMERA_MOVE].tolist() == ["pan_left", "static", None]
    assert out[CAMERA_PAN_X][0] == pytest.approx(-12.0, rel=0.1) and abs(out[CAMERA_PAN_Y][0]) < 0.6
    assert abs(out[CAMERA_ZOOM][0]) < 1.0 and abs(out[CAMERA_ROLL][0]) < 1.0
    assert [out[c][1] for c in (CAMERA_PAN_X, CAMERA_PAN_Y, CAMERA_ZOOM, CAMERA_ROLL)] == [0.0, 0.0, 0.0, 0.0]
    assert out[STATUS][2] == "rejected" and out[REJECT_REASON][2].startswith("motion_error")
    # thresholds come from the config: a dominance no pan reaches makes it complex
    batch = {KEY: np.array(["a"], object), IMAGE: np.array(data[:1], object), IMAGE_EXT: np.array(["mp4"], object),
             STATUS: np.array([KEPT], object), REJECT_REASON: np.array([None], object)}
    assert MotionScore(MotionStageConfig(camera_dominance=1e6))(batch)[CAMERA_MOVE].tolist() == ["complex"]
