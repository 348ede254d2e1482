"""Training frames of a clip: sampled by time at the target fps, decoded only as far as needed."""
import numpy as np
import pytest

from pipeline.synth import write_video
from training.buckets import Bucket
from training.schedule import seeded_rng
from training.video_frames import SkipClip, decode_frames, pick, plan_frames, to_bucket


def numbered(n: int, w: int = 64, h: int = 48) -> list[np.ndarray]:
    """Frame i is flat grey 4 * i (+ a bar so the encoder has texture): its index survives H.264."""
    out = []
    for i in range(n):
        f = np.full((h, w, 3), 4 * i + 8, np.uint8)
        f[:4] = 255
        out.append(f)
    return out


def index_of(frame: np.ndarray) -> int:
    return int(round((float(frame[8:, :].mean()) - 8) / 4))


@pytest.fixture(scope="module")
def clip_30fps(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("clips") / "c.mp4")
    write_video(path, numbered(60), fps=30.0, crf=10)
    return open(path, "rb").read()


def test_frames_are_the_ones_on_screen_at_the_target_rate(clip_30fps):
    rng = seeded_rng(7, "frames", 0, 12)
    plan = plan_frames(0.0, 2.0, 30.0, 6, 7.5, 3.0, 30.0, rng)
    assert plan.fps == 7.5 and len(plan.times) == 6
    frames, times = decode_frames(clip_30fps, plan.times)
    start = round(plan.times[0] * 30)
    assert [index_of(f) for f in frames] == [start + 4 * k for k in range(6)]     # every 4th frame of 30 fps
    np.testing.assert_allclose(times, [(start + 4 * k) / 30 for k in range(6)], atol=1e-6)
    # the same seed, epoch and sample: the same frames; another epoch: another start
    assert plan_frames(0.0, 2.0, 30.0, 6, 7.5, 3.0, 30.0, seeded_rng(7, "frames", 0, 12)) == plan
    assert plan_frames(0.0, 2.0, 30.0, 6, 7.5, 3.0, 30.0, seeded_rng(7, "frames", 1, 12)) != plan


def test_a_short_clip_is_sampled_faster_then_skipped_with_its_reason():
    rng = np.random.default_rng(0)
    # 1 s at 30 fps: 14 frames at 7 fps need 1.86 s -> sampled at 13.9 fps, start 0
    plan = plan_frames(0.0, 1.0, 30.0, 14, 7.0, 3.0, 30.0, rng)
    assert plan.fps == pytest.approx(13 / (1.0 - 1 / 30)) and plan.times[0] == 0.0
    assert plan.times[-1] < 1.0 - 1 / 30 + 1e-9
    with pytest.raises(SkipClip, match="too_short") as exc:
        plan_frames(0.0, 1.0, 30.0, 14, 7.0, 3.0, 10.0, rng)          # max_fps 10 cannot fit 14 frames in 1 s
    assert exc.value.reason == "too_short"
    with pytest.raises(SkipClip, match="fps_too_low"):
        plan_frames(0.0, 10.0, 2.0, 4, 7.0, 3.0, 30.0, rng)
    # a 10 fps clip asked for 25 fps is sampled at its own rate, never duplicating frames
    assert plan_frames(0.0, 3.0, 10.0, 8, 25.0, 3.0, 30.0, rng).fps == 10.0


def test_variable_frame_rate_clips_are_sampled_by_time(tmp_path):
    times = np.cumsum([0.0] + [0.02, 0.06] * 20)[:40]               # alternating 20 ms and 60 ms frames
    path = str(tmp_path / "vfr.mkv")
    write_video(path, numbered(40), fps=25.0, times_s=list(times), crf=10)
    data = open(path, "rb").read()
    targets = [0.05, 0.3, 0.61, 0.99]
    frames, got = decode_frames(data, targets)
    want = pick(times, targets)
    assert [index_of(f) for f in frames] == want.tolist()
    np.testing.assert_allclose(got, times[want], atol=1e-3)


def test_frames_are_cropped_alike_to_the_bucket(clip_30fps):
    frames, _ = decode_frames(clip_30fps, [0.0, 0.5])
    out, (h, w, top, left) = to_bucket(frames, Bucket(32, 32), np.random.default_rng(1))
    assert out.shape == (2, 32, 32, 3) and (h, w) == (48, 64) and top == 0 and 0 <= left <= 11
    assert index_of(out[1]) - index_of(out[0]) == 15


def test_the_clip_index_reads_kept_clips_with_their_timing(tmp_path, clip_30fps):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.contract import tar as tars
    from training.index import build_index

    shards = tmp_path / "run" / "shards"
    shards.mkdir(parents=True)
    blocks = []
    for key in ("a_0000_0000", "a_0000_0001"):
        blocks += [tars.block(f"{key}.mp4", clip_30fps), tars.block(f"{key}.txt", b"grey ramp")]
    blocks.append(tars.end(sum(len(b) for b in blocks)))
    (shards / "00000.tar").write_bytes(b"".join(blocks))
    pq.write_table(pa.table({"key": ["a_0000_0000", "a_0000_0001", "b_0000_0000"],
                             "status": ["kept", "kept", "rejected"], "caption": ["grey ramp", "grey ramp", None],
                             "width": [64, 64, None], "height": [48, 48, None], "fps": [30.0, None, None],
                             "num_frames": [60, 60, None], "motion_score": [1.5, 2.0, None]}),
                   str(shards / "00000.parquet"))
    index, where = build_index(str(tmp_path / "run"), str(tmp_path / "fallback"), clips=True)
    assert where.endswith("train_clip_index.parquet")
    assert index.column("key").to_pylist() == ["a_0000_0000"]          # no fps: cannot be sampled, left out
    row = index.to_pylist()[0]
    assert (row["fps"], row["num_frames"], row["duration_s"], row["motion_score"]) == (30.0, 60, 2.0, 1.5)
    with open(row["shard"], "rb") as fh:
        fh.seek(row["offset"])
        assert fh.read(row["size"]) == clip_30fps
