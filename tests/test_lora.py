"""LoRA through PEFT: which layers get an adapter, the export diffusers loads, the fused copy, and
training runs (SD on 2 workers, SDXL, SVD) where only the adapter changes and resume is exact."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.contract.config import ConfigError
from tests.helpers import kill_at_checkpoint, killable_env
from tests.test_train import ROOT, shards, train_spec  # noqa: F401  (shards is a fixture)
from tests.test_train_svd import clip_run, svd_spec  # noqa: F401  (clip_run is a fixture)


def _losses(out: str) -> dict:
    """Every step's training loss (the last record of a step a killed run logged twice)."""
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return {m["step"]: m["loss"] for m in map(json.loads, fh) if "loss" in m}


def _validation(out: str) -> dict:
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return {m["step"]: m for m in map(json.loads, fh) if "val_loss" in m}


def _lora_spec(**kw):
    from training.train_spec import LoraSpec

    return LoraSpec(enabled=True, **kw)


def _perturbed(params, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_targets_follow_the_layer_choice(tmp_path):
    from training import families
    from training.lora import target_modules

    sd = families.get("sd").tiny(0, str(tmp_path)).unet
    names = target_modules(sd, _lora_spec(), families.get("sd").lora_layers(_lora_spec()))
    # tiny SD: 3 transformer blocks (down, mid, up x2 = 4) x 2 attentions x 4 projections
    assert len(names) == 32 and all(n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0") for n in names)
    svd = families.get("svd").tiny(0, str(tmp_path)).unet
    temporal = target_modules(svd, _lora_spec(), families.get("svd").lora_layers(_lora_spec()))   # auto: temporal
    spatial = target_modules(svd, _lora_spec(layers="spatial"), "spatial")
    assert len(temporal) == len(spatial) == 32
    assert all(".temporal_transformer_blocks." in n for n in temporal)
    assert not any("temporal" in n for n in spatial)
    assert len(target_modules(svd, _lora_spec(layers="all"), "all")) == 64
    with pytest.raises(ValueError, match="match no linear layer"):
        target_modules(sd, _lora_spec(targets=["to_nothing"]), "all")


@pytest.mark.parametrize("kind", ["sd", "svd"])
def test_export_loads_into_the_base_pipeline_and_fuses(kind, tmp_path):
    """The exported file on the base pipeline reproduces the trained UNet (SD through diffusers'
    load_lora_weights, SVD through load_into), changes its output, is under 5 % of the UNet, and the
    fused copy agrees to float rounding.

    Two module instances with equal weights are not bit-identical on every CPU: BLAS and oneDNN
    choose kernels (and so summation orders) by memory alignment, so the outputs (float32, about
    unit scale, some ten reductions deep) are compared to 1e-5: ~100 float32 ulps, 1000 times
    smaller than the adapter's own effect checked first."""
    from training import families
    from training.lora import WEIGHTS_FILE, add_lora, export, fused, load_into

    fam = families.get(kind)
    c = fam.tiny(0, str(tmp_path))
    base = fam.export(c, c.unet, str(tmp_path / "base"))
    params = add_lora(c.unet, _lora_spec(rank=4, alpha=8.0), fam.lora_layers(_lora_spec()), seed=0)
    assert all(p.requires_grad for p in params)
    assert sum(p.requires_grad for p in c.unet.parameters()) == len(params) == 64
    _perturbed(params)
    export(c.unet, str(tmp_path / "lora"), {"base": base})
    size = os.path.getsize(tmp_path / "lora" / WEIGHTS_FILE)
    assert size < 0.05 * os.path.getsize(tmp_path / "base" / "unet" / "diffusion_pytorch_model.safetensors")
    info = json.load(open(tmp_path / "lora" / "winnow_lora.json"))
    assert (info["rank"], info["alpha"], info["parameters"]) == (4, 8.0, 15360)

    torch.manual_seed(1)
    if kind == "sd":
        args = (torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.randn(1, 77, 32))
    else:
        args = (torch.randn(1, 4, 8, 16, 16), torch.tensor([1.0]), torch.randn(1, 1, 32), torch.randn(1, 3))
    pipe = type(fam.build_pipeline(c)).from_pretrained(base)
    with torch.no_grad():
        trained = c.unet(*args).sample
        before = pipe.unet(*args).sample
        load_into(pipe, str(tmp_path / "lora"))
        after = pipe.unet(*args).sample
        merged = fused(c.unet)(*args).sample
    assert (trained - before).abs().max() > 1e-2            # the adapter changes the output
    torch.testing.assert_close(after, trained, rtol=1e-5, atol=1e-5)   # ... and the export restores it
    assert (merged - trained).abs().max() < 1e-5
    assert not any("lora" in n for n, _ in fused(c.unet).named_parameters())


def test_adapter_checkpoint_entry_refuses_another_adapter(tmp_path):
    from training import families
    from training.lora import AdapterWeights, add_lora

    a, b = (families.get("sd").tiny(0, str(tmp_path)).unet for _ in range(2))
    add_lora(a, _lora_spec(rank=4), "all", seed=0)
    add_lora(b, _lora_spec(rank=8), "all", seed=0)
    state = AdapterWeights(a).state_dict()
    assert all(".lora_A." in k or ".lora_B." in k for k in state)
    with pytest.raises(ValueError, match=r"shape \(4, "):
        AdapterWeights(b).load_state_dict(state)
    with pytest.raises(ValueError, match="names differ"):
        AdapterWeights(b).load_state_dict({k: v for k, v in list(state.items())[1:]})


def test_lora_spec_errors_name_the_key(shards, tmp_path):  # noqa: F811
    from training import train_spec as ts

    base = train_spec(shards[0], str(tmp_path / "o"), lora={"enabled": True})
    assert ts.parse(base).lora.rank == 16
    with pytest.raises(ConfigError, match="lora.layers: 'temporal' applies to video UNets"):
        ts.parse({**base, "lora": {"enabled": True, "layers": "temporal"}})
    with pytest.raises(ConfigError, match="set train.fsdp: false with LoRA"):
        ts.parse({**base, "train": {**base["train"], "fsdp": True}})
    with pytest.raises(ConfigError, match="lora.rank"):
        ts.parse({**base, "lora": {"enabled": True, "rank": 0}})
    # the fingerprint of a full run does not change with a switched-off lora section
    full = ts.parse(train_spec(shards[0], str(tmp_path / "o")))
    assert full.fingerprint() == ts.parse({**train_spec(shards[0], str(tmp_path / "o")),
                                          "lora": {"enabled": False}}).fingerprint()
    assert full.fingerprint() != ts.parse(base).fingerprint()
    # no silent settings: a lora section without `enabled` (`--set lora.rank=4`) turns LoRA on, and
    # options beside `enabled: false` are an error that names them
    on = ts.parse({**train_spec(shards[0], str(tmp_path / "o")), "lora": {"rank": 4}})
    assert on.lora.enabled and on.lora.rank == 4
    with pytest.raises(ConfigError, match=r"lora: lora.rank would do nothing with lora.enabled: false"):
        ts.parse({**base, "lora": {"enabled": False, "rank": 4}})
    with pytest.raises(ConfigError, match=r"ema: ema.decay would do nothing with ema.enabled: false"):
        ts.parse({**base, "ema": {"enabled": False, "decay": 0.9}})


VALIDATE = {"eval_every": 6, "eval_fraction": 0.2}


def _lora_train(shards_dir, out, steps=6, **sections):
    lora = {"enabled": True, "rank": 4, "dropout": 0.1, **sections.pop("lora", {})}
    train = {"max_steps": steps, "checkpoint_every": 3, **sections.pop("train", {})}
    return train_spec(shards_dir, out, train=train, lora=lora, optim={"lr": 1e-2}, **sections)


@pytest.fixture(scope="module")
def lora_run(ray_local, shards, tmp_path_factory):  # noqa: F811
    from pipeline.commands import train as trainer
    from training import train_spec as ts

    out = str(tmp_path_factory.mktemp("lora") / "run")
    return out, trainer.run(
        ts.parse(_lora_train(shards[0], out, steps=12, lora={"export_fused": True}, train=VALIDATE)), log=None
    )


def test_sd_lora_run_trains_only_the_adapter(lora_run, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from training.lora import WEIGHTS_FILE

    out, result = lora_run
    s = result.summary
    assert (s["steps"], s["world_size"], s["adapter_parameters"]) == (12, 2, 15360)
    # validation at steps 6 and 12 on the held-out slice, which the training index never holds
    val, held = result.validation, pq.read_table(os.path.join(out, "val_index.parquet"))
    assert [v["step"] for v in val] == [6, 12] and all(v["val_samples"] == held.num_rows > 0 for v in val)
    assert all(np.isfinite(v["val_loss"]) and 0.0 <= v["val_clip_score"] <= 100.0 for v in val)
    trained = set(pq.read_table(os.path.join(out, "index.parquet")).column("key").to_pylist())
    assert not trained & set(held.column("key").to_pylist())
    assert s["base"] == os.path.join(out, "base") and s["final"] == os.path.join(out, "final")
    # the checkpoint holds the adapter, its EMA and AdamW's moments for the adapter alone
    ck = os.path.join(out, "ray", "train", "checkpoint_0000012")
    assert not {"unet", "ema_unet"} & set(os.listdir(ck))
    tensors = load_file(os.path.join(ck, "state.safetensors"))
    assert sum(t.numel() for t in tensors.values()) < 5 * 15360
    # the base pipeline is the untouched preset; the adapter on it reproduces the fused export
    base_unet = load_file(os.path.join(out, "base", "unet", "diffusion_pytorch_model.safetensors"))
    from training import families

    preset = families.get("sd").tiny(0, str(tmp_path)).unet.state_dict()
    assert all(torch.equal(base_unet[k], preset[k]) for k in preset)
    assert os.path.getsize(os.path.join(out, "lora", WEIGHTS_FILE)) < 0.05 * os.path.getsize(
        os.path.join(out, "base", "unet", "diffusion_pytorch_model.safetensors"))

    def image(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe("a photo", num_inference_steps=2, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    pipe = StableDiffusionPipeline.from_pretrained(os.path.join(out, "base"))
    plain = image(pipe)
    pipe.load_lora_weights(os.path.join(out, "lora"))
    adapted = image(pipe)
    fused_image = image(StableDiffusionPipeline.from_pretrained(os.path.join(out, "final")))
    assert np.abs(adapted - plain).max() > 1e-3
    assert np.abs(adapted - fused_image).max() < 1e-4


@pytest.mark.slow
def test_lora_kill9_then_rerun_is_exact(lora_run, shards, tmp_path):  # noqa: F811
    """SIGKILL after the first checkpoint; the rerun's losses (dropout on) and adapter equal the
    uninterrupted run's, bit for bit."""
    import yaml
    from safetensors.torch import load_file

    clean_out, _ = lora_run
    out = str(tmp_path / "run")
    spec_path = str(tmp_path / "spec.yaml")
    with open(spec_path, "w") as fh:
        yaml.safe_dump(_lora_train(shards[0], out, steps=12, lora={"export_fused": True}, train=VALIDATE), fh)
    cmd = [sys.executable, "-m", "pipeline.cli", "train", spec_path]
    env = killable_env(ROOT)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_at_checkpoint(proc, out, 3)
    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["resumed_from"] in (3, 6, 9) and summary["steps"] == 12
    assert _losses(out) == _losses(clean_out) and len(_losses(out)) == 12
    assert (
        _validation(out)[12] == _validation(clean_out)[12]
    )  # the same held-out loss after the resume     # every step, before and after the kill
    a = load_file(os.path.join(clean_out, "lora", "pytorch_lora_weights.safetensors"))
    b = load_file(os.path.join(out, "lora", "pytorch_lora_weights.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sdxl_lora_with_the_latent_cache(ray_local, shards, tmp_path):  # noqa: F811
    from diffusers import StableDiffusionXLPipeline

    from pipeline.commands import train as trainer
    from training import train_spec as ts

    out = str(tmp_path / "run")
    spec = _lora_train(shards[0], out, steps=4, model={"kind": "sdxl"},
                       data={"cache": True, "random_crop": False})
    result = trainer.run(ts.parse(spec), log=None)
    assert result.summary["final"] is None and result.summary["steps"] == 4
    pipe = StableDiffusionXLPipeline.from_pretrained(os.path.join(out, "base"))
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=2, height=64, width=64, output_type="np")
    plain = pipe("a photo", generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(os.path.join(out, "lora"))
    adapted = pipe("a photo", generator=torch.Generator().manual_seed(0), **kw).images
    assert np.abs(adapted - plain).max() > 1e-4


@pytest.mark.slow
def test_svd_lora_trains_temporal_layers_and_resumes(ray_local, clip_run, tmp_path):  # noqa: F811
    from safetensors.torch import load_file

    from pipeline.commands import train as trainer
    from training import train_spec as ts

    def spec(out, steps):
        s = svd_spec(clip_run, out, steps).to_dict()
        s["lora"] = {"enabled": True, "rank": 4}
        s["optim"] = {"lr": 1e-2}
        s["train"].update(eval_every=2, eval_fraction=0.3)
        return ts.parse(s)

    full = trainer.run(spec(str(tmp_path / "full"), 4), log=None)
    trainer.run(spec(str(tmp_path / "split"), 2), log=None)
    resumed = trainer.run(spec(str(tmp_path / "split"), 4), log=None)
    assert [m["loss"] for m in resumed.metrics] == [m["loss"] for m in full.metrics]
    # the EDM validation loss on held-out clips, and the sample video's CLIP scores, at steps 2 and 4
    assert [v["step"] for v in full.validation] == [2, 4] and resumed.validation[-1] == full.validation[-1]
    assert all(np.isfinite(v["val_loss"]) and -1 <= v["val_frame_consistency"] <= 1 for v in full.validation)
    weights = load_file(os.path.join(full.summary["lora"], "pytorch_lora_weights.safetensors"))
    assert weights and all(".temporal_transformer_blocks." in k for k in weights)
    info = json.load(open(os.path.join(full.summary["lora"], "winnow_lora.json")))
    assert info["layers"] == "temporal" and info["kind"] == "svd"
    assert os.path.exists(os.path.join(full.summary["base"], "motion_buckets.json"))
    # winnow eval samples it from a conditioning frame: per-frame CLIP score and frame consistency
    from PIL import Image

    (tmp_path / "frames").mkdir()
    Image.fromarray(np.full((48, 64, 3), 90, np.uint8)).save(tmp_path / "frames" / "0.png")
    (tmp_path / "p.txt").write_text("a clip\n")
    got = _eval("--run", str(tmp_path / "full"), "--prompts", str(tmp_path / "p.txt"), "--frames",
                str(tmp_path / "frames"), "--steps", "2")
    assert got["generated"] == 1 and 0.0 <= got["clip_score"] <= 100.0 and -1.0 <= got["frame_consistency"] <= 1.0
    with Image.open(tmp_path / "full" / "eval" / "lora" / "00000.gif") as im:
        assert (im.n_frames, im.size) == (4, (64, 48))
    # the conditioning frame is kept beside the video and listed, for `winnow prefer`'s page
    listing = json.loads((tmp_path / "full" / "eval" / "lora" / "prompts.jsonl").read_text())
    assert listing["cond"] == "00000.cond.png" and len(listing["cond_sha256"]) == 64
    with Image.open(tmp_path / "full" / "eval" / "lora" / "00000.cond.png") as im:
        assert im.size == (64, 48) and np.asarray(im.convert("RGB")).max() == 90


# ---- winnow eval on a run ----

def _eval(*args) -> dict:
    from pipeline.commands import eval as ev

    parser = __import__("argparse").ArgumentParser()
    ev.arguments(parser)
    result = ev.run(ev.from_args(parser.parse_args(list(args))), log=None)
    return result.to_dict()


def test_eval_samples_a_run_from_its_lora_and_from_its_checkpoint_alike(lora_run, shards, tmp_path):  # noqa: F811
    """A run without final/ is sampled as its adapter on OUTPUT/base; its last checkpoint (the EMA
    adapter) gives the same images; CLIP score and FID come with counts; a rerun repeats them."""
    import shutil

    from PIL import Image

    out, _ = lora_run
    run = str(tmp_path / "run")
    shutil.copytree(out, run, ignore=lambda d, names: ["final", "eval"] if d == out else [])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a dog\n# not a prompt\n\na red car\na bowl of fruit\n")
    common = ["--prompts", str(prompts), "--steps", "2", "--size", "64", "--num", "3"]
    a = _eval("--run", run, *common, "--reference", shards[0], "--fid-weights", "random")
    assert a["weights"] == f"{run}/lora on {run}/base" and a["generated"] == 3
    assert a["counts"]["images"] == {"scored": 3, "skipped": {}} and a["counts"]["reference"]["scored"] > 10
    assert 0.0 <= a["clip_score"] <= 100.0 and a["fid"] > 0.0
    listing = [json.loads(line) for line in open(os.path.join(run, "eval", "lora", "prompts.jsonl"))]
    assert [(p["file"], p["prompt"], p["seed"]) for p in listing] == [
        ("00000.png", "a photo of a dog", 0), ("00001.png", "a red car", 1), ("00002.png", "a bowl of fruit", 2)]
    ck = os.path.join(run, "ray", "train", "checkpoint_0000012")
    b = _eval("--run", run, "--checkpoint", ck, *common, "--out", str(tmp_path / "ck"))
    assert b["weights"] == f"{ck} (step 12)" and b["clip_score"] == a["clip_score"]
    for k in range(3):
        x = np.asarray(Image.open(os.path.join(run, "eval", "lora", f"{k:05d}.png")), np.int16)
        y = np.asarray(Image.open(tmp_path / "ck" / f"{k:05d}.png"), np.int16)
        assert np.abs(x - y).max() <= 1
    again = _eval("--run", run, *common, "--reference", shards[0], "--fid-weights", "random")
    assert again["clip_score"] == a["clip_score"] and again["fid"] == pytest.approx(a["fid"], rel=1e-5)


def test_eval_pairs_a_folder_with_its_prompt_file_and_refuses_what_it_cannot_score(tmp_path):
    from PIL import Image

    from pipeline import cli

    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3)).astype(np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    (tmp_path / "p.txt").write_text("one\ntwo\nthree\n")
    got = _eval("--images", str(tmp_path / "imgs"), "--prompts", str(tmp_path / "p.txt"))
    assert got["counts"]["images"] == {"scored": 3, "skipped": {}} and got["fid"] is None
    assert 0.0 <= got["clip_score"] <= 100.0 and any("random weights" in w for w in got["warnings"])
    listed = [("0.png", "one"), ("0.png", "uno"), ("1.png", "two"), ("9.png", "nine"), ("../0.png", "out")]
    (tmp_path / "imgs" / "prompts.jsonl").write_text(
        "".join(json.dumps({"file": f, "prompt": p}) + "\n" for f, p in listed)
    )
    paired = _eval("--images", str(tmp_path / "imgs"), "--prompts", str(tmp_path / "p.txt"))
    assert paired["counts"]["images"] == {"scored": 3, "skipped": {}}    # each listed pair of a file in the folder
    (tmp_path / "imgs" / "prompts.jsonl").unlink()
    (tmp_path / "p.txt").write_text("one\ntwo\n")
    with pytest.raises(ConfigError, match="2 prompts for 3 files"):
        _eval("--images", str(tmp_path / "imgs"), "--prompts", str(tmp_path / "p.txt"))
    assert cli.main(["eval", "--images", str(tmp_path / "imgs")]) == 2                     # nothing to score
    assert cli.main(["eval", "--run", str(tmp_path / "imgs"), "--prompts", str(tmp_path / "p.txt")]) == 2
    assert cli.main(["eval", "--images", str(tmp_path / "imgs"), "--reference", str(tmp_path / "imgs")]) == 2


def test_holdout_depends_on_the_key_alone_and_respects_the_cap():
    from training.validate import fixed_timesteps, holdout

    keys = [f"s{i:05d}" for i in range(2000)]
    held = holdout(keys, 0, 0.1, 10_000)
    assert 150 < held.sum() < 250                                        # about a tenth
    more = holdout(keys + [f"t{i}" for i in range(500)], 0, 0.1, 10_000)
    assert np.array_equal(more[:2000], held)                              # other samples change nothing
    assert not np.array_equal(holdout(keys, 1, 0.1, 10_000), held)        # the seed does
    capped = holdout(keys, 0, 0.1, 20)
    assert capped.sum() == 20 and np.all(held[capped])
    assert fixed_timesteps(1000) == [62, 187, 312, 437, 562, 687, 812, 937]


def test_frame_consistency_is_the_mean_cosine_of_consecutive_frames():
    from training.evaluate import frame_consistency

    e = np.array([[1.0, 0.0], [0.0, 2.0], [0.0, 1.0]])
    assert frame_consistency(e) == pytest.approx(0.5)           # cos 0, then cos 1
    assert np.isnan(frame_consistency(e[:1]))
