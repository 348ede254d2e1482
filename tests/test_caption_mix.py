"""Training on a caption mix (``data.captions``): the draw depends on (seed, epoch, key) alone, the
shares follow the weights, empty columns fall back in the stated order, and the counts the loader
keeps in its cursor are the same on every world size and across a resume."""
import numpy as np
import pyarrow as pa
import pytest

from pipeline.contract.config import ConfigError
from training import captions
from training.captions import CaptionMix
from training.loader import BucketLoader
from training.schedule import Cursor

N = 4000


def index(n=N, seed=0):
    rng = np.random.default_rng(seed)
    keys = [f"{i:09d}" for i in range(n)]
    vlm = [None if rng.random() < 0.1 else f"vlm {i}" for i in range(n)]        # 10 % without a vlm caption
    return pa.table({"shard": ["s.tar"] * n, "key": keys, "offset": list(range(n)), "size": [1] * n,
                     "caption": [f"src {i}" if i % 7 else "" for i in range(n)],
                     "caption_coca": [f"coca {i}" for i in range(n)], "caption_vlm": vlm,
                     "caption_summary": [None] * n,
                     "width": [64] * n, "height": [64] * n, "original_width": [64] * n, "original_height": [64] * n})


WEIGHTS = {"original": 0.5, "caption_vlm": 0.3, "caption_coca": 0.2}
FALLBACK = captions.DEFAULT_FALLBACK


def test_the_draw_depends_on_seed_epoch_and_key_alone_and_follows_the_weights():
    t = index()
    mix = CaptionMix(t, WEIGHTS, FALLBACK, seed=3)
    picks = [mix.pick(i, 0) for i in range(N)]
    # the same keys in another order (another shard listing, a selection) draw the same columns
    order = np.random.default_rng(1).permutation(N)
    shuffled = CaptionMix(t.take(pa.array(order)), WEIGHTS, FALLBACK, seed=3)
    assert [shuffled.pick(j, 0) for j in range(N)] == [picks[i] for i in order]
    assert [mix.pick(i, 1) for i in range(N)] != picks                     # a new epoch draws again
    assert [CaptionMix(t, WEIGHTS, FALLBACK, seed=4).pick(i, 0) for i in range(N)] != picks
    # the shares before fallback: within 4 standard deviations of a binomial draw of N
    drawn = {c: 0 for c in ("caption", "caption_vlm", "caption_coca")}
    for i in range(N):
        u = captions._unit(3, 0, t.column("key")[i].as_py())
        drawn[mix.columns[int(np.searchsorted(mix.cumulative, u, side="right"))]] += 1
    for col, w in (("caption", 0.5), ("caption_vlm", 0.3), ("caption_coca", 0.2)):
        assert abs(drawn[col] / N - w) < 4 * (w * (1 - w) / N) ** 0.5
    # fallback: an empty source caption (every 7th) or a missing vlm caption takes the first non-empty
    # of caption_summary (always empty here) > caption_vlm > caption_coca > caption
    for i, (text, col) in enumerate(picks):
        assert text == {"caption": f"src {i}", "caption_vlm": f"vlm {i}", "caption_coca": f"coca {i}"}[col]
    assert any(col == "caption_vlm" and i % 7 == 0 for i, (_, col) in enumerate(picks))   # src empty -> vlm
    empty = pa.table({"key": ["a"], "caption": [""], "caption_coca": [None]})
    assert CaptionMix(empty, {"caption": 1}, ["caption_coca"], 0).pick(0, 0) == ("", "none")


def test_weights_and_fallbacks_are_checked():
    assert captions.normalise({"original": 1, "caption_summary": 0}) == {"caption": 1.0}
    for bad, msg in (({"caption_blip": 1}, "not a caption column"), ({"caption": -1}, "must be a number >= 0"),
                     ({"caption": 0}, "sum to 0"), ({"caption": float("nan")}, ">= 0"), ({"caption": True}, ">= 0")):
        with pytest.raises(ConfigError, match=msg):
            captions.check(bad, FALLBACK, False)
    with pytest.raises(ConfigError, match="data.caption_fallback"):
        captions.check({"caption": 1}, ["caption_x"], False)
    with pytest.raises(ConfigError, match="data.cache: the latent cache encodes one caption"):
        captions.check(WEIGHTS, FALLBACK, True)
    captions.check({"caption_coca": 1}, FALLBACK, True)                       # one column caches


def test_a_one_column_mix_is_resolved_into_the_index():
    t = index(50)
    out, counts = captions.resolve_static(t, {"caption_vlm": 1}, FALLBACK, 0)
    vlm = t.column("caption_vlm").to_pylist()
    assert out.column("caption").to_pylist() == [v or f"coca {i}" for i, v in enumerate(vlm)]
    assert counts == {"caption_vlm": sum(1 for v in vlm if v), "caption_coca": sum(1 for v in vlm if not v)}
    assert out.column_names == t.column_names


def _counts(world: int, steps: int, cursor=None):
    t = index(96)
    bucket_of = np.zeros(96, dtype=np.int64)
    bucket_of[::3] = 1
    loaders = [BucketLoader(t, [None, None], bucket_of, cursor or Cursor(), 4 // world, r, world, seed=5,
                            mix=CaptionMix(t, WEIGHTS, FALLBACK, 5)) for r in range(world)]
    plans = [loader._plan() for loader in loaders]
    last = [None] * world
    for _ in range(steps):
        for r, p in enumerate(plans):
            last[r] = next(p)[0]
    for loader in loaders:
        loader.close()
    return last


def test_the_cursor_counts_the_mix_the_same_on_every_world_size_and_across_a_resume():
    one = _counts(1, 40)[0]
    two = _counts(2, 40)
    assert one.captions == two[0].captions == two[1].captions                # every rank, any world size
    assert sum(one.captions.values()) == 40 * 4 and one.epoch >= 1           # 40 global batches of 4
    assert set(one.captions) <= {"caption", "caption_vlm", "caption_coca"}
    half = _counts(1, 17)[0]
    resumed = Cursor.from_dict(half.to_dict())                               # through JSON, as a checkpoint
    assert _counts(2, 23, resumed)[0].captions == one.captions
    # a batch's texts are the mix's picks for its epoch
    t = index(96)
    loader = BucketLoader(t, [None], np.zeros(96, dtype=np.int64), Cursor(), 4, seed=5,
                          mix=CaptionMix(t, WEIGHTS, FALLBACK, 5))
    assert loader.texts([0, 1, 2], 3) == [loader.mix.pick(i, 3)[0] for i in (0, 1, 2)]
    loader.close()
    assert "captions" not in Cursor().to_dict()                             # no mix: the cursor as before


def test_the_spec_refuses_a_mix_that_would_do_nothing_or_cannot_cache():
    from training import train_spec

    base = {"data": {"shards": ["/x"], "captions": {"caption_summary": 1}}, "output": {"path": "/o"}}
    ok = train_spec.parse({**base, "model": {"kind": "svd_t2v"}}, check_paths=False)
    assert ok.data.captions == {"caption_summary": 1}
    with pytest.raises(ConfigError, match="model.kind svd is conditioned on a frame"):
        train_spec.parse({**base, "model": {"kind": "svd"}}, check_paths=False)
    with pytest.raises(ConfigError, match="data.cache: the latent cache encodes one caption"):
        train_spec.parse({"data": {"shards": ["/x"], "captions": WEIGHTS, "cache": True, "random_crop": False},
                          "output": {"path": "/o"}}, check_paths=False)


@pytest.mark.slow
def test_text_to_video_trains_on_a_mix_and_a_resumed_run_sees_the_same_text(ray_local, tmp_path):
    import json
    import os

    from pipeline.commands import train as trainer
    from pipeline.synth import shot, write_video
    from tests.test_video_frames import clip_shard
    from training import train_spec

    path = str(tmp_path / "c.mp4")
    write_video(path, shot(45, 64, 48, 0, motion=1.5), fps=15.0, crf=20)
    rows = [{"key": f"c{i:02d}_0000_0000", "status": "kept", "caption": "", "width": 64, "height": 48,
             "fps": 15.0, "num_frames": 45, "motion_score": float(i), "caption_coca": f"a frame {i}",
             "caption_vlm": None if i % 3 == 0 else f"a video {i}", "caption_summary": f"a summary {i}"}
            for i in range(8)]
    run = clip_shard(tmp_path / "run", open(path, "rb").read(), rows)

    def spec(out, steps):
        return train_spec.parse({
            "kind": "train", "output": {"path": str(out)}, "model": {"kind": "svd_t2v"},
            "data": {"shards": [run], "workers": 2, "prefetch": 2,
                     "captions": {"caption_summary": 0.5, "caption_vlm": 0.3, "caption_coca": 0.2}},
            "video": {"buckets": {"48x64": {4: 1}}, "fps": 7.0},
            "train": {"max_steps": steps, "checkpoint_every": 2, "log_every": 1, "sample_every": 0},
            "ray": {"num_workers": 2}})

    def cursor(out, step):
        return json.load(open(os.path.join(out, "ray", "train", f"checkpoint_{step:07d}", "cursor.json")))

    full = trainer.run(spec(tmp_path / "full", 4), log=None)
    notes = trainer.plan(spec(tmp_path / "full", 4), log=None).notes
    assert "captions: drawn per sample and epoch from caption_summary 50%, caption_vlm 30%, caption_coca 20%; " \
           "the counts are in each checkpoint's cursor" in notes
    counts = cursor(tmp_path / "full", 4)["captions"]
    assert sum(counts.values()) == 4 * 2 and set(counts) <= {"caption_summary", "caption_vlm", "caption_coca"}
    trainer.run(spec(tmp_path / "split", 2), log=None)
    resumed = trainer.run(spec(tmp_path / "split", 4), log=None)
    assert resumed.summary["resumed_from"] == 2
    assert [m["loss"] for m in resumed.metrics] == [m["loss"] for m in full.metrics]
    assert cursor(tmp_path / "split", 4)["captions"] == counts
