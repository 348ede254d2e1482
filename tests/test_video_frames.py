"""Training frames of a clip: sampled by time at the target fps, decoded only as far as needed."""
import numpy as np
import pytest
import torch

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


def clip_shard(folder, data: bytes, rows: list[dict]) -> str:
    """A video run's shard: every row's KEY.mp4 (the same bytes) and the annotation parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.contract import tar as tars

    shards = folder / "shards"
    shards.mkdir(parents=True)
    blocks = []
    for r in rows:
        if r["status"] == "kept":
            blocks += [tars.block(f"{r['key']}.mp4", data), tars.block(f"{r['key']}.txt", b"grey ramp")]
    blocks.append(tars.end(sum(len(b) for b in blocks)))
    (shards / "00000.tar").write_bytes(b"".join(blocks))
    pq.write_table(pa.Table.from_pylist(rows), str(shards / "00000.parquet"))
    return str(folder)


def test_the_clip_index_reads_kept_clips_with_their_timing(tmp_path, clip_30fps):
    from training.index import build_index

    run = clip_shard(tmp_path / "run", clip_30fps, [
        {"key": "a_0000_0000", "status": "kept", "caption": "grey ramp", "width": 64, "height": 48, "fps": 30.0,
         "num_frames": 60, "motion_score": 1.5},
        {"key": "a_0000_0001", "status": "kept", "caption": "grey ramp", "width": 64, "height": 48, "fps": None,
         "num_frames": 60, "motion_score": 2.0},
        {"key": "b_0000_0000", "status": "rejected", "caption": None, "width": None, "height": None, "fps": None,
         "num_frames": None, "motion_score": None}])
    index, where = build_index(run, str(tmp_path / "fallback"), clips=True)
    assert where.endswith("train_clip_index.parquet")
    assert index.column("key").to_pylist() == ["a_0000_0000"]          # no fps: cannot be sampled, left out
    row = index.to_pylist()[0]
    assert (row["fps"], row["num_frames"], row["duration_s"], row["motion_score"]) == (30.0, 60, 2.0, 1.5)
    with open(row["shard"], "rb") as fh:
        fh.seek(row["offset"])
        assert fh.read(row["size"]) == clip_30fps


def test_the_clip_loader_serves_video_buckets_and_resumes_exactly(tmp_path, clip_30fps):
    from training.buckets import assign_clips, video_bucket_table
    from training.conditioning import MotionBucketMap
    from training.index import build_index
    from training.loader import ClipLoader
    from training.schedule import Cursor

    rows = [{"key": f"c{i:02d}_0000_0000", "status": "kept", "caption": f"clip {i}", "width": 64, "height": 48,
             "fps": 30.0, "num_frames": 60 if i < 11 else 5, "motion_score": float(i)} for i in range(12)]
    index, _ = build_index(clip_shard(tmp_path / "run", clip_30fps, rows), str(tmp_path / "fb"), clips=True)
    table = video_bucket_table({"48x64": {6: 2}})
    bucket_of = assign_clips(index.column("width").to_numpy(), index.column("height").to_numpy(),
                             index.column("duration_s").to_numpy(), index.column("fps").to_numpy(), table, 7.0, 30.0)
    assert (bucket_of < 0).sum() == 1                      # clip 11: 5 frames cannot give 6
    motion = MotionBucketMap.fit(index.column("motion_score").to_numpy())(index.column("motion_score").to_numpy())

    def take(cursor, rank, n):
        loader = ClipLoader(index, table, bucket_of, cursor, rank=rank, world_size=2, seed=3, workers=2,
                            motion_ids=motion)
        out = []
        for batch in loader:
            out.append((batch.ids, batch.frames.clone(), batch.fps.tolist(), batch.motion_bucket_id.tolist()))
            if len(out) == n:
                break
        state = loader.state()
        loader.close()
        return out, state, loader.skipped

    full, _, skipped = take(Cursor(), 0, 4)
    assert skipped == 1
    ids0, frames0, fps0, motion0 = full[0]
    assert frames0.shape == (2, 6, 3, 48, 64) and fps0 == [7.0, 7.0] and motion0 == motion[ids0].tolist()
    assert all(11 not in ids for ids, *_ in full)
    other, _, _ = take(Cursor(), 1, 4)                      # rank 1: the other half of the same global batches
    assert all(not set(a[0]) & set(b[0]) for a, b in zip(full, other, strict=True))
    first, state, _ = take(Cursor(), 0, 2)
    rest, _, _ = take(state, 0, 2)
    for (ia, fa, *_), (ib, fb, *_) in zip(full[2:], rest, strict=True):
        assert ia == ib and torch.equal(fa, fb)             # same clips, same frames, after a resume
