"""Bucket table, assignment and crops; the global schedule's invariants and its cursor."""
import numpy as np
import pytest

from training.buckets import Bucket, assign, bucket_table, kept_fraction, plan_crop, square_kept_fraction
from training.schedule import Cursor, Schedule, rank_slice


def test_sdxl_bucket_table_is_the_papers():
    table = [(b.width, b.height) for b in bucket_table(1024)]
    assert len(table) == 33 and table[0] == (512, 2048) and table[-1] == (2048, 512)
    assert (1024, 1024) in table and (1152, 896) in table and (1344, 768) in table and (1600, 640) in table
    for w, h in table:
        assert w % 64 == 0 and h % 64 == 0 and 0.9 * 1024 ** 2 <= w * h <= 1024 ** 2
    assert [(b.width, b.height) for b in bucket_table(512)][8] == (512, 512)


def test_nearest_bucket_in_log_aspect_and_cover_crop():
    table = bucket_table(1024)
    idx = assign(np.array([1920, 1000, 600, 3000]), np.array([1080, 1000, 2400, 500]), table)
    assert [(table[i].width, table[i].height) for i in idx] == [(1344, 768), (1024, 1024), (512, 2048), (2048, 512)]
    crop = plan_crop(1920, 1080, Bucket(1344, 768))
    assert (crop.resize_w, crop.resize_h, crop.left, crop.top) == (1366, 768, 11, 0)
    assert (crop.original_w, crop.original_h) == (1920, 1080)
    assert kept_fraction(1920, 1080, Bucket(1344, 768)) == pytest.approx(1344 / 1366)
    assert square_kept_fraction(1920, 1080) == pytest.approx(0.5625)
    rand = plan_crop(1920, 1080, Bucket(1344, 768), np.random.default_rng(0))
    assert 0 <= rand.left <= 22 and rand.top == 0


def make(n=103, buckets=5, seed=1):
    return Schedule(np.random.default_rng(seed).integers(0, buckets, n), seed=7)


def run_epoch(s, cursor, g):
    cursor = Schedule.start(cursor, g)
    batches = s.batches(cursor)
    cursor = Schedule.advance(cursor, len(batches))
    return batches, s.next_epoch(cursor)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_sample_once_per_epoch_one_bucket_per_step(world):
    s = make()
    g = 4 * world
    cursor = Cursor()
    batches, nxt = run_epoch(s, cursor, g)
    seen = [x for b in batches for x in b]
    assert len(seen) == len(set(seen))
    assert sorted(seen + nxt.carry) == list(range(103))              # the rest is carried, counted
    assert all(len(set(s.buckets[b].tolist())) == 1 and len(b) == g for b in batches)
    assert all(np.sum(s.buckets[nxt.carry] == k) < g for k in range(5))
    ranks = [[rank_slice(b, r, world) for r in range(world)] for b in batches]
    assert all(sorted(sum(r, [])) == sorted(b) for r, b in zip(ranks, batches, strict=True))
    batches1, nxt1 = run_epoch(s, nxt, g)                             # the carry is trained first
    seen1 = [x for b in batches1 for x in b]
    assert sorted(seen1 + nxt1.carry) == list(range(103))
    assert set(nxt.carry) <= set(x for b in batches1[:len(batches1)] for x in b)
    assert batches1 != batches


def test_resume_at_step_k_gives_the_same_remaining_order():
    s = make()
    cursor = Schedule.start(Cursor(), 8)
    full = s.batches(cursor)
    for k in (0, 1, 5, len(full)):
        resumed = Cursor.from_dict(Schedule.advance(cursor, k).to_dict())   # through JSON, as a checkpoint
        assert s.batches(resumed) == full[k:]


def test_world_size_change_remaps_without_replay_or_skip():
    s = make(n=211)
    cursor = Schedule.start(Cursor(), 8)             # 2 ranks x 4
    first = s.batches(cursor)[:6]
    cursor = Schedule.start(Schedule.advance(cursor, 6), 12)   # resumed on 3 ranks
    rest = s.batches(cursor)
    assert all(len(b) == 12 and len(set(s.buckets[b].tolist())) == 1 for b in rest)
    done = Schedule.advance(cursor, len(rest))
    carry = s.next_epoch(done).carry
    seen = [x for b in first + rest for x in b]
    assert len(seen) == len(set(seen)) and sorted(seen + carry) == list(range(211))
    assert Cursor.from_dict(done.to_dict()).segments == [[8, 6], [12, len(rest)]]


def test_schedule_is_seeded():
    a, b = make(), make()
    c = Schedule(a.buckets, seed=8)
    cur = Schedule.start(Cursor(), 4)
    assert a.batches(cur) == b.batches(cur) != c.batches(cur)


def test_video_buckets_have_three_aspects_and_their_own_batch_sizes():
    from training.buckets import VideoBucket, assign_clips, video_bucket_table

    table = video_bucket_table({"256x384": {14: 4, 8: 8}, "320x576": {14: 1}})
    assert {(b.width, b.height) for b in table} == {(384, 256), (256, 384), (320, 320), (576, 320), (320, 576),
                                                    (448, 448)}
    assert VideoBucket(384, 256, 8, 8) in table and VideoBucket(576, 320, 14, 1) in table and len(table) == 9
    clips = [(1920, 1080, 5.0, 30.0),   # big landscape: 576x320, 14 frames at 7 fps
             (300, 200, 2.0, 10.0),     # smaller than every bucket of its aspect: the smallest, 14 frames fit
             (300, 200, 1.0, 10.0),     # 14 frames fit at no allowed rate; 8 do at 10 fps
             (1080, 1920, 0.3, 30.0),   # too short for any bucket
             (720, 720, 3.0, 24.0)]     # square
    ids = assign_clips(*zip(*clips, strict=True), table, target_fps=7.0, max_fps=30.0)
    got = [None if i < 0 else table[i] for i in ids]
    assert got == [VideoBucket(576, 320, 14, 1), VideoBucket(384, 256, 14, 4), VideoBucket(384, 256, 8, 8), None,
                   VideoBucket(448, 448, 14, 1)]
    # a clip slower than min_fps is in no bucket (the sampler would refuse it: fps_too_low)
    assert assign_clips([640, 640], [360, 360], [10.0, 10.0], [2.0, 24.0], table, 7.0, 30.0, min_fps=3.0)[0] == -1


def test_per_bucket_batch_sizes_keep_every_rank_on_one_bucket_and_resume_exactly():
    buckets = np.random.default_rng(4).integers(0, 3, 300)
    batch_of = {0: 4, 1: 2, 2: 1}          # per rank
    s = Schedule(buckets, seed=9, batch_of=batch_of)
    cur = Schedule.start(Cursor(), 2)      # 2 ranks
    batches = s.batches(cur)
    for b in batches:
        kinds = set(buckets[b].tolist())
        assert len(kinds) == 1 and len(b) == 2 * batch_of[kinds.pop()]
        r0, r1 = rank_slice(b, 0, 2), rank_slice(b, 1, 2)
        assert len(r0) == len(r1) and not set(r0) & set(r1)
    resumed = s.batches(Schedule.advance(cur, 7))
    assert resumed == batches[7:]
    # a world-size change mid-epoch: the rest of the epoch at 1 rank, no sample twice
    one = Schedule.start(Schedule.advance(cur, 7), 1)
    seen = [x for b in batches[:7] for x in b] + [x for b in s.batches(one) for x in b]
    assert len(seen) == len(set(seen))
    # without batch_of the image schedule is unchanged
    assert Schedule(buckets, seed=9).batches(cur) == Schedule(buckets, seed=9, batch_of={}).batches(cur)
