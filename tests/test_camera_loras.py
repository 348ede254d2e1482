"""`winnow camera-loras`: one temporal LoRA per camera move, chosen by curation's camera_move; and
`winnow eval`'s controllability on such a run."""
import json
import os

import numpy as np
import pytest

from pipeline.contract.config import ConfigError
from tests.test_video_frames import clip_shard

MOVES = ["pan_left"] * 4 + ["static"] * 3 + ["zoom_in", "complex", None]


def _clip_run(root) -> str:
    """A video run of 10 kept clips (64x48, 15 fps, 3 s) labelled with the moves above, and one
    rejected row labelled pan_left (it must not count)."""
    from pipeline.synth import shot, write_video

    path = str(root / "c.mp4")
    write_video(path, shot(45, 64, 48, 0, motion=1.5), fps=15.0, crf=20)
    rows = [{"key": f"c{i:02d}_0000_0000", "status": "kept", "caption": f"clip {i}", "width": 64, "height": 48,
             "fps": 15.0, "num_frames": 45, "motion_score": float(i), "camera_move": m} for i, m in enumerate(MOVES)]
    rows.append({**rows[0], "key": "r00_0000_0000", "status": "rejected"})
    return clip_shard(root / "run", open(path, "rb").read(), rows)


@pytest.fixture(scope="module")
def move_run(tmp_path_factory):
    return _clip_run(tmp_path_factory.mktemp("moves"))


def _spec(run, out, **extra):
    from pipeline.commands import camera_loras

    doc = {"kind": "camera-loras", "clips": run, "output": {"path": out}, "moves": ["pan_left", "static", "zoom_in"],
           "min_clips": 3, "ray": {"num_workers": 1},
           "train": {"model": {"kind": "svd"}, "video": {"buckets": {"48x64": {4: 1}}, "fps": 7.0},
                     "lora": {"rank": 2}, "optim": {"lr": 1e-2},
                     "train": {"max_steps": 2, "checkpoint_every": 2, "log_every": 1}}}
    for k, v in extra.items():
        doc[k] = v
    return camera_loras.parse(doc)


def test_the_spec_is_checked_before_anything_runs(move_run, tmp_path):
    base = dict(clips=move_run, out=str(tmp_path / "o"))
    with pytest.raises(ConfigError, match="'pan_up' is not a camera_move"):
        _spec(move_run, base["out"], moves=["pan_up"])
    for train, msg in [({"model": {"kind": "sd"}}, "'temporal' applies to video UNets"),
                       ({"lora": {"layers": "spatial"}}, "temporal attention"),
                       ({"data": {"shards": ["x"]}}, "train.data.shards"),
                       ({"output": {"path": "x"}}, "train.output"),
                       ({"model": {"kind": "svd"}, "optim": {"lr": -1}}, "the run of pan_left")]:
        with pytest.raises(ConfigError, match=msg):
            _spec(move_run, base["out"], train=train)
    with pytest.raises(ConfigError, match="min_clips"):
        _spec(move_run, base["out"], min_clips=0)


def test_the_plan_counts_each_moves_kept_clips(move_run, tmp_path):
    from pipeline.commands import camera_loras

    got = {p["move"]: (p["clips"], p["train"], p["done"]) for p in camera_loras.plan(_spec(move_run, str(tmp_path)))}
    assert got == {"pan_left": (4, True, False), "static": (3, True, False), "zoom_in": (1, False, False)}
    with pytest.raises(ConfigError, match="no camera_move column"):
        camera_loras.clip_moves(clip_shard(tmp_path / "old", b"x", [{"key": "a", "status": "kept"}]))


@pytest.mark.slow
def test_one_adapter_per_move_that_has_clips_resumes_and_is_scored(ray_local, move_run, tmp_path):
    import torch
    from diffusers import StableVideoDiffusionPipeline
    from PIL import Image

    from pipeline.commands import camera_loras
    from pipeline.contract import layout
    from training import index
    from training.lora import load_into

    out = str(tmp_path / "loras")
    r = camera_loras.run(_spec(move_run, out), log=None)
    got = {m["move"]: (m["clips"], m["status"]) for m in r.moves}
    assert got == {"pan_left": (4, "trained"), "static": (3, "trained"),
                   "zoom_in": (1, "too few clips (1 < min_clips 3)")}
    doc = json.load(open(os.path.join(out, "camera_loras.json")))
    assert doc["unlisted"] == {"complex": 1} and [m["adapter"] is None for m in doc["moves"]] == [False, False, True]
    # each manifest selects exactly its move's kept clips, and the run trained on them
    man = layout.read_table(os.path.join(out, "selections", "pan_left.parquet"))
    assert man.column("key").to_pylist() == [f"c{i:02d}_0000_0000" for i in range(4)]
    trained = index.load_index([move_run], str(tmp_path / "idx"), selection=os.path.join(out, "selections",
                                                                                      "static.parquet"), clips=True)
    assert sorted(trained.column("key").to_pylist()) == [f"c{i:02d}_0000_0000" for i in (4, 5, 6)]
    # a re-run trains nothing again
    again = camera_loras.run(_spec(move_run, out), log=None)
    assert [m["status"] for m in again.moves][:2] == ["trained earlier", "trained earlier"]
    # every adapter loads onto the same base with training.lora.load_into, and changes its output
    base = os.path.join(out, "moves", "pan_left", "base")
    frame = Image.fromarray(np.full((48, 64, 3), 120, np.uint8))

    def sample(adapter=None):
        pipe = StableVideoDiffusionPipeline.from_pretrained(base)
        pipe.set_progress_bar_config(disable=True)
        if adapter:
            load_into(pipe, adapter)
        return pipe(frame, height=48, width=64, num_frames=4, num_inference_steps=2, output_type="np",
                    generator=torch.Generator().manual_seed(0)).frames[0]

    plain = sample()
    for move in ("pan_left", "static"):
        assert np.abs(sample(os.path.join(out, "moves", move, "lora")) - plain).max() > 1e-5
    # winnow eval on a camera LoRA: the share of samples that move its way, against the base
    from pipeline.commands import eval as ev

    (tmp_path / "frames").mkdir()
    for k in range(3):
        Image.fromarray(np.full((48, 64, 3), 60 + 50 * k, np.uint8)).save(tmp_path / "frames" / f"{k}.png")
    (tmp_path / "p.txt").write_text("a\nb\nc\n")
    res = ev.run(ev.EvalSpec(run=os.path.join(out, "moves", "pan_left"), prompts=str(tmp_path / "p.txt"),
                             frames=str(tmp_path / "frames"), steps=2), log=None)
    cam = res.camera
    assert cam["move"] == "pan_left" and cam["samples"] == 3 and sum(cam["moves"].values()) == 3
    assert 0.0 <= cam["share"] <= 1.0 and cam["base_share"] is not None and sum(cam["base_moves"].values()) == 3
    assert "camera" in ev.format_summary(res)


def test_adapters_loaded_side_by_side_switch_like_each_alone(tmp_path):
    """Two temporal adapters (random, non-zero) exported and loaded onto one SVD pipeline under their
    moves' names: use_adapter picks one, and the pipeline then samples what it samples with that one
    loaded alone; adapters_disabled gives the base."""
    import tempfile

    import torch
    from PIL import Image

    from training import train_spec
    from training.families import get
    from training.lora import adapters_disabled, add_lora, export, load_into, use_adapter

    fam = get("svd")
    lora = train_spec.parse({"kind": "train", "data": {"shards": ["x"]}, "output": {"path": "y"},
                             "model": {"kind": "svd"}, "lora": {"enabled": True, "rank": 2}}, check_paths=False).lora

    def comps():
        with tempfile.TemporaryDirectory() as scratch:
            return fam.tiny(0, scratch, "v_prediction")

    for k, move in enumerate(("pan_left", "zoom_in")):
        c = comps()
        params = add_lora(c.unet, lora, "temporal", seed=k)
        with torch.no_grad():
            for p in params:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(k))
        export(c.unet, str(tmp_path / move), {"base": "tiny"})
    frame = Image.fromarray(np.full((48, 64, 3), 120, np.uint8))

    def sample(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe(frame, height=48, width=64, num_frames=4, num_inference_steps=2, output_type="np",
                    generator=torch.Generator().manual_seed(0)).frames[0]

    alone = {}
    for move in ("pan_left", "zoom_in"):
        pipe = fam.build_pipeline(comps())
        load_into(pipe, str(tmp_path / move), adapter_name=move)
        alone[move] = sample(pipe)
    base = sample(fam.build_pipeline(comps()))
    both = fam.build_pipeline(comps())
    for move in ("pan_left", "zoom_in"):
        load_into(both, str(tmp_path / move), adapter_name=move)
    for move in ("zoom_in", "pan_left"):
        use_adapter(both.unet, move)
        np.testing.assert_allclose(sample(both), alone[move], atol=1e-5)
    assert np.abs(alone["pan_left"] - alone["zoom_in"]).max() > 1e-3
    with adapters_disabled(both.unet) as n:
        assert n > 0
        np.testing.assert_allclose(sample(both), base, atol=1e-5)
    with pytest.raises(ValueError, match="no adapter 'static'"):
        use_adapter(both.unet, "static")
