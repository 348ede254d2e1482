"""SVD image-to-video training on 2 Ray Train workers: clips in video buckets, a resumed run takes
the uninterrupted run's steps, and OUTPUT/final is a StableVideoDiffusionPipeline folder."""
import json
import os

import numpy as np
import pytest

from tests.test_video_frames import clip_shard


def make_clip_run(root) -> str:
    """A video run of 9 generated clips (8 of 3 s, one of 3 frames), 64x48 at 15 fps, motion 0..8."""
    from pipeline.synth import shot, write_video

    path = str(root / "c.mp4")
    write_video(path, shot(45, 64, 48, 0, motion=1.5), fps=15.0, crf=20)
    rows = [{"key": f"c{i:02d}_0000_0000", "status": "kept", "caption": f"clip {i}", "width": 64, "height": 48,
             "fps": 15.0, "num_frames": 45 if i < 8 else 3, "motion_score": float(i)} for i in range(9)]
    return clip_shard(root / "run", open(path, "rb").read(), rows)


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    return make_clip_run(tmp_path_factory.mktemp("svd_data"))


def svd_spec(run: str, out: str, steps: int):
    from training import train_spec

    return train_spec.parse({"kind": "train", "data": {"shards": [run], "workers": 2, "prefetch": 2},
                             "output": {"path": out}, "model": {"kind": "svd"},
                             "video": {"buckets": {"48x64": {4: 1}}, "fps": 7.0},
                             "train": {"max_steps": steps, "checkpoint_every": 2, "log_every": 1},
                             "ray": {"num_workers": 2}})


@pytest.mark.slow
def test_svd_trains_resumes_exactly_and_exports_a_video_pipeline(ray_local, clip_run, tmp_path):
    from diffusers import StableVideoDiffusionPipeline
    from PIL import Image

    from pipeline.commands import train as trainer

    full = trainer.run(svd_spec(clip_run, str(tmp_path / "full"), 4), log=None)
    losses = [m["loss"] for m in full.metrics]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert full.summary["kind"] == "svd" and full.summary["prediction_type"] == "v_prediction"
    # a sample video from the first clip's first frame, at the end of the run (and in TensorBoard)
    (gif,) = full.summary["samples"]
    with Image.open(gif) as im:
        assert gif.endswith(".gif") and im.n_frames == 4 and im.size == (64, 48)
    # the same run stopped after step 2 and resumed to 4 takes the same steps, bit for bit
    trainer.run(svd_spec(clip_run, str(tmp_path / "split"), 2), log=None)
    resumed = trainer.run(svd_spec(clip_run, str(tmp_path / "split"), 4), log=None)
    assert resumed.summary["resumed_from"] == 2 and [m["loss"] for m in resumed.metrics] == losses
    # the motion map the run fitted (on the 8 clips long enough for a bucket) travels with the export
    final = full.summary["final"]
    motion = json.load(open(os.path.join(final, "motion_buckets.json")))
    assert motion["knots"] == [float(i) for i in range(8)]
    pipe = StableVideoDiffusionPipeline.from_pretrained(final)
    pipe.set_progress_bar_config(disable=True)
    frames = pipe(Image.fromarray(np.zeros((48, 64, 3), np.uint8)), height=48, width=64, num_frames=4,
                  num_inference_steps=2, decode_chunk_size=2, output_type="np").frames
    assert np.asarray(frames).shape == (1, 4, 48, 64, 3)


def test_svd_spec_errors_before_ray(clip_run, tmp_path):
    from pipeline.contract.config import ConfigError
    from training import train_spec

    base = {"data": {"shards": [clip_run]}, "output": {"path": str(tmp_path / "o")}, "model": {"kind": "svd"}}
    with pytest.raises(ConfigError, match="data.cache: the latent cache holds image latents"):
        train_spec.parse({**base, "data": {"shards": [clip_run], "cache": True, "random_crop": False}})
    with pytest.raises(ConfigError, match="video.buckets: video bucket resolution '256by384'"):
        train_spec.parse({**base, "video": {"buckets": {"256by384": {14: 1}}}})
    with pytest.raises(ConfigError, match=r"video.fps 40 must lie in \[min_fps 3, max_fps 30\]"):
        train_spec.parse({**base, "video": {"fps": 40}})


def test_a_selection_manifest_picks_clips_as_it_picks_images(clip_run, tmp_path):
    """A ``winnow sweep`` manifest over a video run restricts the clip index to its keys (built
    serially here: no Ray)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.contract.config import ConfigError
    from pipeline.contract.layout import MANIFEST_RUNS
    from training.index import load_index, run_folder

    keys = ["c01_0000_0000", "c04_0000_0000", "c07_0000_0000"]
    path = str(tmp_path / "cell_000.parquet")
    table = pa.table({"run": [0] * 3, "key": keys})
    pq.write_table(table.replace_schema_metadata({MANIFEST_RUNS: json.dumps([run_folder(clip_run)])}), path)
    index = load_index([clip_run], str(tmp_path), selection=path, clips=True)
    assert sorted(index.column("key").to_pylist()) == keys
    assert index.column("motion_score").to_pylist() == [1.0, 4.0, 7.0]
    stale = str(tmp_path / "stale.parquet")              # a key the run no longer has is an error, not a skip
    pq.write_table(pa.table({"run": [0], "key": ["c99_0000_0000"]}).replace_schema_metadata(
        {MANIFEST_RUNS: json.dumps([run_folder(clip_run)])}), stale)
    with pytest.raises(ConfigError, match="1 of the 1 selected samples are not in the shard sets"):
        load_index([clip_run], str(tmp_path), selection=stale, clips=True)
