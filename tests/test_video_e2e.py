"""`winnow curate` on a folder of generated videos: clips, scores, the videos/ tables, resume."""
import io
import json
import os
import tarfile

import av
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.contract import layout
from pipeline.contract.config import ConfigError
from pipeline.synth import make_video_corpus, shot, write_video
from tests.helpers import annotations, run_curate, shard_stats, tar_members
from tests.test_kill_resume import kill_when, start

STAGES = [{"name": "clips", "min_s": 1.0, "max_s": 4.0}, {"name": "motion"},
          {"name": "ocr", "backend": "rapidocr", "max_area_ratio": 0.05}]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("videos"))
    return root, make_video_corpus(root)


@pytest.fixture(scope="module")
def video_run(ray_local, videos, tmp_path_factory):
    root, _ = videos
    out = str(tmp_path_factory.mktemp("vrun") / "out")
    result = run_curate(root, out, stages=STAGES, output_options={"videos_per_shard": 4})
    return out, result


def by_source(df):
    return {s: g.sort_values("key") for s, g in df.groupby("source")}


def test_every_video_gets_a_row_with_cuts_or_a_reason(videos, video_run):
    _, expect = videos
    out, result = video_run
    v = layout.read_videos(out).to_pandas().set_index("source")
    assert sorted(v.index) == sorted(expect)
    for name, exp in expect.items():
        if "reason" in exp:
            assert v.loc[name, "status"] == "rejected" and v.loc[name, "reject_reason"].startswith(exp["reason"]), name
        else:
            assert list(v.loc[name, "cut_times_s"]) == exp["cuts"], name
    assert v.loc["empty.mp4", "reject_reason"] == "probe_error: empty file"
    assert v.loc["audio_only.mp4", "reject_reason"] == "no_video_stream: audio-only"
    assert v.loc["poster.mp4", "reject_reason"].startswith("ocr_area_ratio")     # its only clip had text
    assert bool(v.loc["vfr.mp4", "variable_frame_rate"]) and v.loc["rotated.mp4", "rotation"] == 90
    assert result.videos == {"inputs": 10, "with_clips": 6, "without_clips": 4, "clips": 12,
                             "reasons": {"probe_error": 2, "no_video_stream": 1, "ocr_area_ratio": 1}}
    assert (result.inputs, result.kept, result.rejected) == (16, 12, 4)
    schema = layout.read_videos(out).schema
    for name in ("width", "height", "display_width", "display_height", "rotation", "num_frames", "num_windows",
                 "segments", "num_clips"):
        assert schema.field(name).type == "int64", name
    # one schema per glob: shards/*.parquet are the clip rows only; per-shard video rows live in videos/
    import pyarrow.dataset as ds

    assert sorted(os.listdir(os.path.join(out, "videos"))) == ["00000.parquet", "00001.parquet", "00002.parquet"]
    import glob

    files = sorted(glob.glob(os.path.join(out, "shards", "*.parquet")))
    assert ds.dataset(files, format="parquet").to_table().num_rows == 16
    assert len({pq.read_schema(f).names[0] for f in files}) == 1


def test_clip_boundaries_follow_cuts_margins_fades_and_timestamps(video_run):
    out, _ = video_run
    clips = by_source(annotations(out))
    span = lambda name: [(r.start_s, r.end_s, int(r.num_frames)) for r in clips[name].itertuples()]  # noqa: E731
    assert span("three_shots.mp4") == [(0.0, 2.8, 28), (3.2, 5.3, 21), (5.7, 9.5, 38)]
    assert span("static.mp4") == [(0.0, 4.0, 40), (4.0, 5.0, 10)]                 # max_s 4
    assert span("fade.mp4") == [(0.0, 2.8, 28), (3.7, 6.6, 29)]                   # black and ramp trimmed
    assert span("vfr.mp4") == [(0.0, 1.8, 18), (2.25, 5.0, 11)]                   # 0.25 s frames after the cut
    assert clips["three_shots.mp4"]["clip_index"].tolist() == [0, 1, 2]
    assert clips["three_shots.mp4"]["caption"].tolist() == ["a pan, a still view, another pan"] * 3


def test_static_clips_score_far_below_moving_ones(video_run):
    out, _ = video_run
    df = annotations(out).dropna(subset=["motion_score"])
    clips = by_source(df)
    static = [*clips["static.mp4"]["motion_score"], clips["three_shots.mp4"]["motion_score"].iloc[1]]
    moving = [*clips["pan.mp4"]["motion_score"], *clips["fade.mp4"]["motion_score"],
              *clips["rotated.mp4"]["motion_score"], clips["three_shots.mp4"]["motion_score"].iloc[0]]
    assert max(static) < 0.1 and min(moving) > 10
    pairs = clips["pan.mp4"]["motion_pairs"].iloc[0]
    assert len(pairs) == 7 and np.mean(pairs) == pytest.approx(clips["pan.mp4"]["motion_score"].iloc[0], abs=1e-3)
    assert "motion_frames" not in df.columns       # the clips stage's frames for motion travel in flight only


def test_shards_hold_playable_mp4_clips(video_run):
    out, _ = video_run
    df = annotations(out).set_index("key")
    members = [n for ms in tar_members(out).values() for n in ms]
    kept = sorted(df.index[df["status"] == "kept"])
    assert sorted(n[:-4] for n in members if n.endswith(".mp4")) == kept
    assert sum(s["kept"] for s in shard_stats(out)) == 12
    with tarfile.open(os.path.join(out, "shards", "00001.tar")) as tf:
        names = tf.getnames()
        key = next(n for n in names if n.endswith(".mp4"))[:-4]
        data = tf.extractfile(f"{key}.mp4").read()
        meta = json.loads(tf.extractfile(f"{key}.json").read())
    with av.open(io.BytesIO(data)) as c:
        frames = list(c.decode(video=0))
    row = df.loc[key]
    assert len(frames) == row["num_frames"] == meta["num_frames"]
    assert (frames[0].width, frames[0].height) == (row["width"], row["height"]) and frames[0].width % 2 == 0
    assert meta["video_key"] == key.split("_")[0] and "frames" not in meta and "window_rows" not in meta
    rot = df[df["source"] == "rotated.mp4"].iloc[0]
    assert (rot["width"], rot["height"]) == (160, 96)                             # upright
    emb = os.path.join(out, "embeddings")
    assert not os.path.exists(emb)                                                # no clip stage in this run


def test_long_videos_are_cut_into_windows_that_no_clip_spans(ray_local, tmp_path):
    root = tmp_path / "long"
    root.mkdir()
    write_video(str(root / "long.mp4"), shot(120, 96, 64, seed=3, motion=1), fps=10)        # 12 s
    out = str(tmp_path / "out")
    run_curate(str(root), out, stages=[{"name": "clips", "min_s": 1.0, "max_s": 4.0, "window_s": 5.0}])
    df = annotations(out)
    assert [k[-9:-5] for k in df["key"]] == ["0000", "0000", "0001", "0001", "0002"]   # window of each clip
    assert [(r.start_s, r.end_s) for r in df.itertuples()] == [(0.0, 4.0), (4.0, 5.0), (5.0, 9.0), (9.0, 10.0),
                                                              (10.0, 12.0)]
    assert df["clip_index"].tolist() == [0, 1, 2, 3, 4]
    v = layout.read_videos(out).to_pylist()[0]
    assert v["num_windows"] == 3 and v["num_clips"] == 5


def test_a_parquet_of_video_paths_is_a_video_input(ray_local, videos, tmp_path):
    import pyarrow as pa

    root, _ = videos
    table = pa.table({"path": [os.path.join(root, "pan.mp4"), os.path.join(root, "missing.mp4")],
                      "caption": ["from the parquet", "gone"]})
    pq.write_table(table, str(tmp_path / "list.parquet"))
    out = str(tmp_path / "out")
    result = run_curate(str(tmp_path / "list.parquet"), out, stages=[{"name": "clips"}], input={"base_dir": root})
    df = annotations(out)
    assert result.videos["inputs"] == 2 and df["caption"].tolist() == ["from the parquet", "gone"]
    assert df["reject_reason"].tolist()[1] == "missing_file: not found"


def test_stages_must_match_the_input_kind(videos, tmp_path, corpus):
    root, _ = videos
    with pytest.raises(ConfigError, match="holds videos, but the stages are an image run's"):
        run_curate(root, str(tmp_path / "a"), stages=["decode"])
    with pytest.raises(ConfigError, match="'clips' cuts videos"):
        run_curate(corpus[0], str(tmp_path / "b"), stages=["clips"])
    with pytest.raises(ConfigError, match="'clips' must be the first stage"):
        run_curate(root, str(tmp_path / "c"), stages=["clips", "motion", "clips"])
    with pytest.raises(ConfigError, match="min_s: 5.0 is longer than max_s 4.0"):
        run_curate(root, str(tmp_path / "d"), stages=[{"name": "clips", "min_s": 5, "max_s": 4}])


@pytest.mark.slow
def test_kill9_during_clips_then_rerun_gives_the_same_clips(ray_local, videos, video_run, tmp_path):
    root, _ = videos
    clean = str(tmp_path / "clean")
    run_curate(root, clean, samples_per_shard=4, output_options={"videos_per_shard": 3})
    out = str(tmp_path / "out")
    proc = start(root, out, "--set", "output.videos_per_shard=3")
    assert kill_when(proc, os.path.join(out, "_work/rows/*/*.parquet")), "the run finished before it was killed"
    assert not os.path.exists(os.path.join(out, "summary.json"))
    run_curate(root, out, samples_per_shard=4, output_options={"videos_per_shard": 3})
    a, b = annotations(out), annotations(clean)
    names = [n for ms in tar_members(out).values() for n in ms]
    assert len(names) == len(set(names))                                   # no clip twice
    assert tar_members(out) == tar_members(clean)                          # none lost
    assert a["key"].tolist() == b["key"].tolist() and a["status"].tolist() == b["status"].tolist()
    assert np.allclose(a["motion_score"].fillna(-1), b["motion_score"].fillna(-1), atol=1e-6)
    assert layout.read_videos(out).to_pylist() == \
        layout.read_videos(clean).to_pylist()


def test_a_window_past_its_deadline_is_a_timeout_row_and_the_worker_goes_on(tmp_path):
    """Probing and cutting run in a child process with ``clips.timeout_s``: a window that takes longer
    becomes a rejected ``timeout`` row (the child is killed), and the next video is cut as usual."""
    from pipeline.contract.schema import KEY, REF_PATH, REJECT_REASON, STATUS
    from pipeline.contract.stage import batch_rows
    from video.clips import ClipsConfig, SplitClips, VideoWindows

    for name, seed in (("a.mp4", 1), ("b.mp4", 2)):
        write_video(str(tmp_path / name), shot(30, 96, 64, seed=seed, motion=1), fps=10)
    batch = {KEY: np.array(["v0", "v1"], dtype=object),
             REF_PATH: np.array([str(tmp_path / "a.mp4"), str(tmp_path / "b.mp4")], dtype=object)}
    windows = VideoWindows(ClipsConfig(min_s=1.0, max_s=2.0, timeout_s=60))(batch)
    assert list(windows[STATUS]) == ["kept", "kept"]
    slow = SplitClips(ClipsConfig(min_s=1.0, max_s=2.0, timeout_s=1e-4))(
        {k: v[:1] for k, v in windows.items()})
    rows = list(batch_rows(slow))
    assert [(r[KEY], r[STATUS], r[REJECT_REASON]) for r in rows] == [
        ("v0_0000_0000", "rejected", "timeout: cutting and encoding the window took more than 0.0001 s")]
    rows = list(
        batch_rows(SplitClips(ClipsConfig(min_s=1.0, max_s=2.0, timeout_s=60))({k: v[1:] for k, v in windows.items()}))
    )
    assert [(r[STATUS], round(r["start_s"], 2), round(r["end_s"], 2)) for r in rows] == [("kept", 0.0, 2.0),
                                                                                      ("kept", 2.0, 3.0)]
    assert rows[0]["image"][4:8] == b"ftyp"                       # the encoded clip came back through the pipe


def test_timeouts_reconcile_in_a_run(ray_local, tmp_path):
    root = tmp_path / "v"
    root.mkdir()
    write_video(str(root / "a.mp4"), shot(20, 96, 64, seed=1, motion=1), fps=10)
    write_video(str(root / "b.mp4"), shot(20, 96, 64, seed=2, motion=1), fps=10)
    result = run_curate(str(root), str(tmp_path / "out"), stages=[{"name": "clips", "min_s": 1.0, "timeout_s": 1e-4}])
    assert (result.inputs, result.kept, result.rejected) == (2, 0, 2)
    assert result.videos["reasons"] == {"timeout": 2}


def test_a_video_dry_run_samples_videos_and_projects_clips(ray_local, videos, tmp_path):
    from pipeline.commands import curate, curate_spec

    root, expect = videos
    spec = curate_spec.parse({"input": {"path": root}, "output": {"path": str(tmp_path / "out")},
                              "stages": STAGES[:2], "dry_run": {"enabled": True, "sample": 40}})
    got = curate.run(spec, log=None)
    assert (got.unit, got.inputs, got.sampled) == ("videos", len(expect), 4)        # a tenth of the sample
    assert not (tmp_path / "out").exists() and os.listdir(tmp_path) == []
    assert [s["stage"] for s in got.stages] == ["probe", "clips", "motion"]
    assert got.projected_rows == round(got.sample_rows * len(expect) / 4) and got.sample_rows >= 4
    assert got.projected_wall_s > 0 and 0 <= got.kept_fraction <= 1
