"""The staged curriculum on 2 Ray Train workers: an SD image stage, a text-to-video stage inflated
from it, an image-to-video stage widened from that; a re-run skips finished stages; fingerprints chain."""
import json
import os

import pytest
import torch

from tests.helpers import kill_at_checkpoint, killable_env
from tests.test_train_svd import make_clip_run


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    return make_clip_run(tmp_path_factory.mktemp("clips"))


def stages_spec(image_run, clip_run, out, lr=1e-4, last_steps=2):
    video = {"buckets": {"48x64": {4: 1}}, "fps": 7.0}
    train = {"max_steps": 2, "checkpoint_every": 2, "log_every": 1, "batch_size": 1, "sample_prompts": []}
    return {
        "kind": "curriculum",
        "output": {"path": out},
        "ray": {"num_workers": 2},
        "stages": [
            {
                "name": "image",
                "data": {"shards": [image_run], "resolution": 64},
                "model": {"kind": "sd"},
                "optim": {"lr": lr},
                "train": train,
            },
            {
                "name": "video_lowres",
                "init": "previous",
                "data": {"shards": [clip_run]},
                "model": {"kind": "svd_t2v"},
                "video": {**video, "p_mean": 0.0},
                "train": train,
            },
            {
                "name": "image_to_video",
                "init": "previous",
                "data": {"shards": [clip_run]},
                "model": {"kind": "svd"},
                "video": video,
                "train": {**train, "max_steps": last_steps, "fsdp": True},
            },
        ],
    }     # the video UNet sharded


@pytest.mark.slow
def test_three_stages_chain_inflate_skip_and_export(ray_local, image_run, clip_run, tmp_path):
    from diffusers import StableVideoDiffusionPipeline

    from pipeline.commands import curriculum
    from pipeline.contract.config import ConfigError

    out = str(tmp_path / "svd")
    r = curriculum.run(curriculum.parse(stages_spec(image_run, clip_run, out)), log=None)
    assert [s["name"] for s in r.stages] == ["image", "video_lowres", "image_to_video"]
    assert all(not s["skipped"] and s["steps"] == 2 for s in r.stages)
    assert sorted(os.listdir(os.path.join(out, "stages"))) == ["01_image", "02_video_lowres", "03_image_to_video"]
    inits = sorted(os.listdir(os.path.join(out, "init")))
    assert len(inits) == 2
    info = json.load(open(os.path.join(out, "init", inits[0], "inflation.json")))
    assert info["counts"]["unused"] == 0 and info["counts"]["mapped"] > 0     # stage 2 = stage 1's UNet, inflated
    assert info["in_channels"] == 4 and info["inherited"] == ["text_encoder", "tokenizer"]
    assert info["vae"]["counts"]["unused"] == 0                               # and its VAE, a temporal decoder
    stage1 = os.path.join(out, "stages", "01_image", "final")
    for part in ("text_encoder", "tokenizer"):  # stage 2 reads stage 1's text encoder
        assert sorted(os.listdir(os.path.join(out, "init", inits[0], part))) == sorted(
            os.listdir(os.path.join(stage1, part))
        )
    from safetensors.torch import load_file

    enc = [
        load_file(os.path.join(d, "text_encoder", "model.safetensors"))
        for d in (stage1, os.path.join(out, "init", inits[0]))
    ]
    assert enc[0].keys() == enc[1].keys() and all(torch.equal(enc[0][k], enc[1][k]) for k in enc[0])
    # stage 3 = stage 2's final UNet with conv_in widened from 4 to 8 input channels, the new ones zero
    info3 = json.load(open(os.path.join(out, "init", inits[1], "inflation.json")))
    assert info3["widened"] and info3["in_channels"] == 8 and info3["counts"]["new"] == 0
    t2v = load_file(
        os.path.join(out, "stages", "02_video_lowres", "final", "unet", "diffusion_pytorch_model.safetensors")
    )
    i2v = load_file(os.path.join(out, "init", inits[1], "unet", "diffusion_pytorch_model.safetensors"))
    assert torch.equal(i2v["conv_in.weight"][:, :4], t2v["conv_in.weight"]) and not i2v["conv_in.weight"][:, 4:].any()
    assert all(torch.equal(i2v[k], t2v[k]) for k in t2v if k != "conv_in.weight")
    pipe = StableVideoDiffusionPipeline.from_pretrained(r.final)
    assert pipe.unet.config.in_channels == 8
    summary = json.load(open(os.path.join(out, "stages", "03_image_to_video", "summary.json")))
    assert summary["distributed"] == "FSDP2" and summary["samples"]
    assert os.listdir(os.path.join(out, "stages", "02_video_lowres", "samples")) == ["step0000002_0.gif"]
    # a re-run finds every stage finished
    again = curriculum.run(curriculum.parse(stages_spec(image_run, clip_run, out)), log=None)
    assert all(s["skipped"] for s in again.stages)
    # more steps in the last stage continue it; the first two stay as they are
    more = curriculum.run(curriculum.parse(stages_spec(image_run, clip_run, out, last_steps=4)), log=None)
    assert [s["skipped"] for s in more.stages] == [True, True, False] and more.stages[2]["resumed_from"] == 2
    # a changed first stage changes every later stage's fingerprint (chained through the init folder)
    steps_a = curriculum.plan(curriculum.parse(stages_spec(image_run, clip_run, out)))
    steps_b = curriculum.plan(curriculum.parse(stages_spec(image_run, clip_run, out, lr=2e-4)))
    assert all(a["fingerprint"] != b["fingerprint"] for a, b in zip(steps_a, steps_b, strict=True))
    with pytest.raises(ConfigError, match="made by a different spec"):
        curriculum.run(curriculum.parse(stages_spec(image_run, clip_run, out, lr=2e-4)), log=None)


def test_curriculum_spec_errors(image_run, clip_run, tmp_path):
    from pipeline.commands import curriculum
    from pipeline.contract.config import ConfigError

    good = stages_spec(image_run, clip_run, str(tmp_path / "o"))
    bad = json.loads(json.dumps(good))
    bad["stages"][0]["init"] = "previous"
    with pytest.raises(ConfigError, match="the first stage has no previous stage"):
        curriculum.parse(bad)
    bad = json.loads(json.dumps(good))
    bad["stages"][1]["video"]["fps"] = 99
    with pytest.raises(ConfigError, match=r"stages\[1\] \(video_lowres\): video.fps 99"):
        curriculum.parse(bad)
    bad = json.loads(json.dumps(good))
    bad["stages"][2]["model"]["kind"] = "sd"
    bad["stages"][2]["data"] = {"shards": [image_run], "resolution": 64}
    bad["stages"][2].pop("video")
    with pytest.raises(ConfigError, match="cannot turn a video model back into an image model"):
        curriculum.plan(curriculum.parse(bad))
    bad = json.loads(json.dumps(good))                  # image-to-video cannot narrow back to text-to-video
    bad["stages"][1]["model"]["kind"], bad["stages"][2]["model"]["kind"] = "svd", "svd_t2v"
    with pytest.raises(ConfigError, match=r"a svd_t2v stage starts from a svd_t2v stage or from none, not from svd"):
        curriculum.plan(curriculum.parse(bad))
    bad = json.loads(json.dumps(good))
    bad["stages"] = bad["stages"][:1] + [
        {**bad["stages"][0], "name": "xl", "init": "previous", "model": {"kind": "sdxl"}}
    ]
    with pytest.raises(ConfigError, match="a sdxl stage cannot start from a sd stage"):
        curriculum.plan(curriculum.parse(bad))


def test_the_svd_curriculum_job_is_the_papers_stages(image_run, clip_run, tmp_path):
    from pipeline.commands import curriculum
    from pipeline.contract.config import load_yaml

    doc = load_yaml("jobs/svd_curriculum.yaml")
    doc["output"]["path"] = str(tmp_path / "o")
    for st in doc["stages"]:                       # the template's data paths are examples
        st["data"]["shards"] = [image_run if st["model"]["kind"] == "sd" else clip_run]
    spec = curriculum.parse(doc)
    assert [(s.name, s.init, s.doc["model"]["kind"]) for s in spec.stages] == [
        ("image", None, "sd"), ("video_lowres", "previous", "svd_t2v"), ("video_finetune", "previous", "svd_t2v"),
        ("image_to_video", "previous", "svd")]
    video = [s.doc["video"] for s in spec.stages[1:]]
    assert [v["buckets"] for v in video] == [{"256x384": {14: 4}}, {"320x576": {14: 2}}, {"320x576": {14: 1}}]
    assert [(v["p_mean"], v["p_std"]) for v in video] == [(-1.2, 1.2), (0.0, 1.6), (0.7, 1.6)]
    for st in spec.stages[1:]:                     # the paths are examples; the stage order is what is checked
        st.doc["model"].pop("pretrained", None)
    assert [s["spec"].model.kind for s in curriculum.plan(spec)] == ["sd", "svd_t2v", "svd_t2v", "svd"]


@pytest.mark.slow
def test_kill9_in_stage_two_then_rerun_skips_stage_one_and_matches_bit_for_bit(ray_local, image_run, clip_run,
                                                                                 tmp_path):
    """SIGKILL the curriculum (driver and its Ray) after stage 2's first checkpoint; the rerun skips
    stage 1 and stage 2 continues from its cursor with the uninterrupted run's losses and weights."""
    import subprocess
    import sys

    import yaml
    from safetensors.torch import load_file

    from pipeline.commands import curriculum

    def spec(out):
        doc = stages_spec(image_run, clip_run, out)
        doc["stages"] = doc["stages"][:2]
        doc["stages"][1]["train"] = {**doc["stages"][1]["train"], "max_steps": 12}
        return doc

    clean = str(tmp_path / "clean")
    curriculum.run(curriculum.parse(spec(clean)), log=None)
    out = str(tmp_path / "killed")
    path = str(tmp_path / "curriculum.yaml")
    with open(path, "w") as fh:
        yaml.safe_dump(spec(out), fh)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "pipeline.cli", "curriculum", path]
    env = killable_env(root)
    proc = subprocess.Popen(cmd, cwd=root, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    kill_at_checkpoint(proc, os.path.join(out, "stages", "02_video_lowres"), 2, timeout=400)
    assert not os.path.exists(os.path.join(out, "final"))
    rerun = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "stage 1 image finished earlier; skipped" in rerun.stderr
    import re

    resumed = re.search(r"video_lowres +12 steps, resumed from (\d+)", rerun.stdout)
    assert resumed and int(resumed.group(1)) in (2, 4, 6, 8, 10), rerun.stdout

    def losses(run):
        with open(os.path.join(run, "stages", "02_video_lowres", "metrics.jsonl")) as fh:
            return {m["step"]: m["loss"] for m in map(json.loads, fh)}

    assert losses(out) == losses(clean) and len(losses(out)) == 12
    a = load_file(os.path.join(clean, "final", "unet", "diffusion_pytorch_model.safetensors"))
    b = load_file(os.path.join(out, "final", "unet", "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_optimizer_carry_takes_the_stage_befores_moments_and_only_between_one_model(image_run, clip_run, tmp_path):
    """optimizer: carry puts the previous stage's last AdamW moments beside the init weights and the
    stage's optim.init_state points at them; the worker loads the moments with its own
    hyperparameters (no Ray here: the init folder from a planted finished stage)."""
    from pipeline.commands import curriculum
    from pipeline.contract.config import ConfigError
    from training.checkpoint import CheckpointError, carry_optimizer, save_state

    doc = stages_spec(image_run, clip_run, str(tmp_path / "o"))
    doc["stages"] = [doc["stages"][0], {**doc["stages"][0], "name": "image_more", "init": "previous",
                                        "optimizer": "carry", "optim": {"lr": 5e-5}}]
    steps = curriculum.plan(curriculum.parse(doc))
    assert steps[1]["spec"].optim.init_state == os.path.join(steps[1]["init"], curriculum.OPTIMIZER_STATE)
    # a finished stage 1: its final pipeline and its last checkpoint's optimizer state
    from training.families import get

    comps = get("sd").tiny(0, str(tmp_path / "scratch"))
    get("sd").export(comps, comps.unet, os.path.join(steps[0]["dir"], "final"))
    params = list(comps.unet.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    sum(p.float().pow(2).sum() for p in params).backward()
    opt.step()
    for step in (2, 4):
        ckpt = os.path.join(steps[0]["dir"], "ray", "train", f"checkpoint_{step:07d}")
        os.makedirs(ckpt)
        save_state(ckpt, {"optimizer": opt.state_dict(), "step": step})
    report = curriculum.build_init(steps[0], steps[1], log=None)
    assert report["optimizer_from"].endswith("checkpoint_0000004")
    fresh = torch.optim.AdamW(params, lr=5e-5)
    assert carry_optimizer(steps[1]["spec"].optim.init_state, fresh, params) == len(params)
    assert fresh.param_groups[0]["lr"] == 5e-5                          # this stage's rate, the stage before's moments
    assert all(torch.equal(fresh.state[p]["exp_avg_sq"], opt.state[p]["exp_avg_sq"]) for p in params)
    other = get("svd").tiny(0, str(tmp_path / "s2")).unet                 # another model's parameters: refused
    with pytest.raises(CheckpointError, match="does not fit this model"):
        carry_optimizer(
            steps[1]["spec"].optim.init_state, torch.optim.AdamW(other.parameters()), list(other.parameters())
        )
    # carry across inflation, or without init, is a spec error before anything runs
    bad = stages_spec(image_run, clip_run, str(tmp_path / "o2"))
    bad["stages"][1]["optimizer"] = "carry"
    with pytest.raises(ConfigError, match=r"optimizer: carry needs the same model as the stage before \(sd -> svd_t2v"):
        curriculum.plan(curriculum.parse(bad))
    bad["stages"][1].pop("init")
    with pytest.raises(ConfigError, match="needs init: previous"):
        curriculum.parse(bad)


def test_a_lora_stage_exports_fused_so_the_next_stage_starts_from_it(image_run, clip_run, tmp_path):
    """A curriculum stage may train a LoRA (here temporal adapters on the text-to-video stage); its
    spec always exports the fused pipeline, which the next stage and final/ start from."""
    from pipeline.commands import curriculum

    doc = stages_spec(image_run, clip_run, str(tmp_path / "o"))
    doc["stages"][1]["lora"] = {"enabled": True, "rank": 4}
    spec = curriculum.parse(doc)
    ts = curriculum._train_spec(spec, spec.stages[1], init_path=str(tmp_path / "init"))
    assert ts.lora.enabled and ts.lora.export_fused and ts.model.pretrained == str(tmp_path / "init")
    assert not curriculum._train_spec(spec, spec.stages[0], init_path=None).lora.enabled
