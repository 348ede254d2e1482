"""The splice generator: every class's ground truth is exactly where the shots change."""
import numpy as np
import pytest

from video.splice import (
    BLACK,
    CLASSES,
    CLASSES_WITH_CUTS,
    NEGATIVE_CLASSES,
    RATES,
    SIZES,
    Builder,
    Shot,
    shots_between_cuts,
    split_groups,
)


def code(k: int) -> int:
    """A blue level that is not linear in the shot number, so a blend of two shots reads as none."""
    return (37 * k * k) % 200 + 30


def solid_shots(n_groups=3, per_group=3):
    """Shots of one flat colour each (shot k: R = 40 + 20 k, B = code(k)), 2-4 s at 25 fps, so
    every output frame says which shot it came from, whatever the resize."""
    shots, k = [], 0
    for g in range(n_groups):
        for _ in range(per_group):
            frame = np.zeros((90, 160, 3), np.uint8)
            frame[..., 0], frame[..., 1], frame[..., 2] = 40 + 20 * k, 128, code(k)
            shots.append(Shot([frame] * (50 + 10 * k), 25.0, f"g{g}", f"s{k}"))
            k += 1
    return shots


def shot_of(frame):
    """The shot id of a flat frame, or None for black and for mixed frames (glitch, flash, blend)."""
    r = frame[..., 0]
    if (frame == BLACK).all() or r.std() > 0.5 or abs(int(frame[..., 1].mean()) - 128) > 1:
        return None
    k = int(round((float(r.mean()) - 40) / 20))
    ok = abs(float(r.mean()) - (40 + 20 * k)) <= 1 and abs(float(frame[..., 2].mean()) - code(k)) <= 1
    return k if ok else None


@pytest.mark.parametrize("klass", CLASSES_WITH_CUTS)
def test_the_cuts_are_where_the_shot_changes(klass):
    v = Builder(solid_shots(), seed=3).make(klass, 0)
    ids = [shot_of(f) for f in v.frames]
    seen = [(i, s) for i, s in enumerate(ids) if s is not None]
    changes = [i for (i, s), (_, prev) in zip(seen[1:], seen[:-1], strict=True) if s != prev]
    if klass == "glitch_before_cut":                  # the corrupted frames are not shots: skip them
        assert sum(s is None for s in ids) >= 2
    if klass == "black_start":
        assert ids[0] is None and (v.frames[0] == BLACK).all() and v.cuts[0] > seen[0][0]
    if klass == "returns":                            # A B A B ...: two shots, alternating
        assert len({s for _, s in seen}) == 2 and len(v.cuts) >= 4
    assert changes == v.cuts and v.cuts
    assert (v.frames[0].shape[1], v.frames[0].shape[0]) in SIZES and v.fps in RATES
    assert all(f.shape == v.frames[0].shape for f in v.frames)


@pytest.mark.parametrize("klass", NEGATIVE_CLASSES)
def test_negatives_have_no_cut(klass):
    v = Builder(solid_shots(), seed=5).make(klass, 0)
    assert v.cuts == []
    ids = [shot_of(f) for f in v.frames]
    if klass in ("flash", "glitch"):                  # one shot, one or two odd frames in it
        assert len({s for s in ids if s is not None}) == 1 and 1 <= sum(s is None for s in ids) <= 4
    if klass in ("fade", "dissolve"):                 # two shots joined by in-between frames, never directly
        real = [(i, s) for i, s in enumerate(ids) if s is not None]
        jumps = [i for (i, s), (j, p) in zip(real[1:], real[:-1], strict=True) if s != p]
        assert len(jumps) == 1 and ids[jumps[0] - 1] is None


def test_short_shots_are_8_to_20_frames_and_sets_cover_every_class():
    from video.splice import build_set

    v = Builder(solid_shots(), seed=1).make("short", 0)
    bounds = [0, *v.cuts, len(v.frames)]
    assert all(8 <= b - a <= 20 for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    videos = build_set(solid_shots(), 1, seed=2)
    assert [v.klass for v in videos] == list(CLASSES)
    assert build_set(solid_shots(), 1, seed=2)[4].cuts == videos[4].cuts        # seeded


def test_shots_between_cuts_drop_margins_damage_and_black():
    frames = [np.full((2, 2, 3), 100 + i % 100, np.uint8) for i in range(100)]

    def runs(shots):
        return [(int(s.frames[0][0, 0, 0]) - 100, int(s.frames[-1][0, 0, 0]) - 100) for s in shots]

    shots = shots_between_cuts(frames, 25.0, [30, 70], "g", "v", margin=3, damaged=((50, 60),))
    # margins around the damage too; 63-66 is shorter than min_len and dropped
    assert runs(shots) == [(0, 26), (33, 46), (73, 99)]
    for i in range(80, 84):                          # a fade to black inside the last run splits it
        frames[i] = np.zeros((2, 2, 3), np.uint8)
    assert runs(shots_between_cuts(frames, 25.0, [30, 70], "g", "v", margin=3)) == [
        (0, 26), (33, 66), (84, 99)]                 # 73-79 is shorter than min_len


def test_split_is_by_source_stable_and_disjoint():
    groups = [f"src{i}" for i in range(9)]
    tune, validate = split_groups(groups)
    assert tune.isdisjoint(validate) and tune | validate == set(groups) and len(tune) == 4
    assert split_groups(list(reversed(groups))) == (tune, validate)
