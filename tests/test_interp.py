"""svd_interp: SVD's UNet filling in the frames between a clip's first and last (Blattmann et al.
2023, sec. 4.4): widened from its parent, the given frames and their mask, the loss on the frames
between, the sampler that turns N fps into 2N or 4N, kill -9 and resume, and the PSNR / SSIM
scores against the linear blend."""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

from pipeline.contract.config import ConfigError
from tests.helpers import kill_at_checkpoint, killable_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H, W, F = 48, 64, 5


def _comps(kind, seed=0):
    from training import families

    with tempfile.TemporaryDirectory() as scratch:
        return families.get(kind).tiny(seed, scratch, "v_prediction", num_frames=F)


def _call(unet, x, seed=1):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(x.shape[0], 1, unet.config.cross_attention_dim, generator=g)
    ids = torch.tensor([[14.0, 127.0, 0.02]] * x.shape[0])
    with torch.no_grad():
        return unet(x, torch.tensor([0.3] * x.shape[0]), emb, added_time_ids=ids).sample


@pytest.mark.parametrize("parent", ["svd", "svd_t2v"])
def test_the_widened_unet_computes_what_its_parent_did(parent):
    from training.families import get, transition
    from training.inflate import widen_video_unet

    unet = _comps(parent).unet.eval()
    have = unet.config.in_channels
    wide, report = widen_video_unet(unet, 9)
    wide.eval()
    assert wide.config.in_channels == 9 and transition(get(parent), get("svd_interp"), "here") == "widen"
    x = torch.randn(1, F, 9, H // 8, W // 8, generator=torch.Generator().manual_seed(0))
    # whatever the new channels hold (the given frames, the mask), the output is the parent's
    torch.testing.assert_close(_call(wide, x), _call(unet, x[:, :, :have]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="a svd stage starts from a svd stage or from svd_t2v"):
        transition(get("svd_interp"), get("svd"), "x")             # never back from interpolation


def test_the_given_frames_and_their_mask_sit_where_they_belong():
    from training.families.svd_interp import given_mask, interp_condition

    mask = given_mask(F)
    assert mask.tolist() == [True, False, False, False, True]
    given = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 2, 3, 2, 2) + 1
    cond = interp_condition(given, mask, F)
    assert cond.shape == (1, F, 4, 2, 2)
    assert torch.equal(cond[0, 0, :3], given[0, 0]) and torch.equal(cond[0, 4, :3], given[0, 1])
    assert not cond[0, 1:4, :3].any()
    assert cond[0, :, 3].flatten(1).mean(1).tolist() == [1.0, 0.0, 0.0, 0.0, 1.0]


def test_the_loss_counts_only_the_frames_between():
    from training.families import get
    from training.objectives import EDM

    fam, c = get("svd_interp"), _comps("svd_interp")
    frames = torch.rand(2, F, 3, H, W, generator=torch.Generator().manual_seed(3)) * 2 - 1

    class Perturbed(torch.nn.Module):        # the real UNet, its output on the given frames replaced
        def __init__(self, unet, at):
            super().__init__()
            self.unet, self.at = unet, at

        def forward(self, *a, **k):
            out = self.unet(*a, **k)
            out.sample[:, self.at] = 1e3
            return out

    def loss(unet):
        one = torch.ones(2, dtype=torch.bool)
        return fam.loss(c, frames, torch.tensor([28.0, 28.0]), torch.tensor([127, 60]), EDM(1.0), 0.7, 1.6,
                        torch.Generator().manual_seed(0), one, one, unet=unet)

    base = loss(c.unet)
    assert torch.isfinite(base).all() and base.shape == (2,)
    torch.testing.assert_close(loss(Perturbed(c.unet, [0, F - 1])), base)           # given frames: no effect
    assert (loss(Perturbed(c.unet, [2])) > base * 10).all()                          # a frame between: counted


def _run_model(buckets=None):
    from training import train_spec
    from training.families import get
    from training.generate import RunModel

    spec = train_spec.parse({"kind": "train", "data": {"shards": ["x"]}, "output": {"path": "y"},
                             "model": {"kind": "svd_interp"},
                             "video": {"buckets": buckets or {f"{H}x{W}": {F: 1}}, "fps": 28.0}}, check_paths=False)
    return RunModel(spec, get("svd_interp"), _comps("svd_interp"), "tiny")


def test_the_sampler_fills_every_gap_2x_or_4x_and_the_given_frames_pass_through():
    from PIL import Image

    from training.generate import interpolate_video

    m = _run_model()
    given = [Image.fromarray(np.random.default_rng(k).integers(0, 255, (H, W, 3), dtype=np.uint8)) for k in range(3)]
    four = interpolate_video(m, given, factor=4, steps=2)
    two = interpolate_video(m, given, factor=2, steps=2)
    assert len(four) == 9 and len(two) == 5 and all(f.size == (W, H) for f in four + two)
    for k, im in enumerate(given):
        assert np.array_equal(np.asarray(four[4 * k]), np.asarray(im))
        assert np.array_equal(np.asarray(two[2 * k]), np.asarray(im))
    # 2x keeps the middle of the three frames 4x predicts (the same seed per gap)
    assert np.array_equal(np.asarray(two[1]), np.asarray(four[2]))
    with pytest.raises(ConfigError, match="fills a gap 2x or 4x"):
        interpolate_video(m, given, factor=3)
    with pytest.raises(ConfigError, match="needs at least 3"):
        _run_model({f"{H}x{W}": {2: 1}})


def test_psnr_ssim_and_the_blend_against_hand_values():
    from training.evaluate import linear_blend, psnr, ssim

    a, b = np.zeros((16, 16, 3), np.uint8), np.full((16, 16, 3), 10, np.uint8)
    assert psnr(a, b) == pytest.approx(10 * np.log10(255 ** 2 / 100))          # MSE 100
    assert psnr(a, a) == float("inf") and ssim(b, b) == pytest.approx(1.0)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2                            # flat images: luminance term only
    flat = ssim(np.full((16, 16), 50, np.uint8), np.full((16, 16), 100, np.uint8))
    assert flat == pytest.approx((2 * 50 * 100 + c1) / (50 ** 2 + 100 ** 2 + c1) * c2 / c2, rel=1e-9)
    assert linear_blend(np.full((2, 2), 0, np.uint8), np.full((2, 2), 200, np.uint8), 0.25).tolist() == [[50, 50]] * 2
    # against scikit-image's SSIM with Wang et al.'s settings (Gaussian 11 / 1.5, population covariances)
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    y = np.clip(x.astype(int) + rng.integers(-40, 40, x.shape), 0, 255).astype(np.uint8)
    ref = structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255,
                                channel_axis=2)
    assert ssim(x, y) == pytest.approx(ref, abs=1e-12)      # float64 both: only the summation order differs


def _lpips_files(folder, seed=0):
    """LPIPS's two files in their released layouts, random: torchvision's AlexNet (features only: the
    classifier is never used) and five positive linear layers."""
    import torchvision

    torch.manual_seed(seed)
    feats = torchvision.models.alexnet().features
    torch.save({"features." + k: v for k, v in feats.state_dict().items()}, folder / "alexnet.pth")
    lin = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 192, 384, 256, 256))}
    torch.save(lin, folder / "alex.pth")
    return str(folder / "alexnet.pth"), str(folder / "alex.pth")


def test_lpips_is_zero_for_the_same_image_symmetric_and_grows_with_the_difference(tmp_path):
    from training.evaluate import Lpips

    alex, lin = _lpips_files(tmp_path)
    d = Lpips(alex, lin)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)

    def noisy(s):
        return np.clip(x.astype(int) + rng.integers(-s, s + 1, x.shape), 0, 255).astype(np.uint8)

    near, far = noisy(10), noisy(80)
    assert d(x, x) == 0.0 and d(x, far) == pytest.approx(d(far, x), rel=1e-5)
    assert 0 < d(x, near) < d(x, far)
    # by hand on the first block: unit-normalised relu1 features, squared difference, weighted, averaged
    import torchvision

    torch.manual_seed(0)
    feats = torchvision.models.alexnet().features
    feats.load_state_dict({k[len("features."):]: v for k, v in torch.load(alex).items()})
    lin0 = torch.load(lin)["lin0.model.1.weight"]
    one = Lpips(alex, lin)
    one.weights = [lin0] + [torch.zeros_like(w) for w in one.weights[1:]]
    t = torch.from_numpy(np.stack([x, far]).astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    t = (t - torch.tensor([-0.030, -0.088, -0.188]).reshape(1, 3, 1, 1)) / torch.tensor([0.458, 0.448, 0.450]).reshape(
        1, 3, 1, 1)
    with torch.no_grad():
        f = feats[:2](t)
    f = f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
    want = float(((f[0] - f[1]) ** 2 * lin0[0]).sum(0).mean())
    assert one(x, far) == pytest.approx(want, rel=1e-5)
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="not torchvision's AlexNet"):
        Lpips(str(tmp_path / "other.pth"), lin)
    with pytest.raises(ConfigError, match="not LPIPS's AlexNet linear layers"):
        Lpips(alex, str(tmp_path / "other.pth"))


def test_winnow_interpolate_doubles_a_videos_frame_rate(tmp_path, capsys):
    """A tiny svd_interp run folder (its spec and an exported final/) and a 4-frame 6 fps video:
    7 frames at 12 fps out, at the run's bucket size; bad arguments fail before any model loads."""
    import yaml

    from pipeline import cli
    from pipeline.contract.layout import TrainRun
    from pipeline.synth import shot, write_video
    from video.probe import probe

    m = _run_model()
    run = tmp_path / "run"
    m.family.export(m.comps, m.comps.unet, str(run / "final"))
    with open(run / TrainRun.SPEC, "w") as fh:
        yaml.safe_dump(m.spec.to_dict(), fh)
    write_video(str(tmp_path / "in.mp4"), shot(4, 96, 64, 3, motion=2.0), fps=6.0, crf=18)
    args = ["interpolate", "--run", str(run), str(tmp_path / "in.mp4"), "--out", str(tmp_path / "out.mp4"),
            "--steps", "1"]
    assert cli.main([*args, "--factor", "2"]) == 0
    assert "4 frames at 6 fps -> 7 frames at 12 fps, 64x48" in capsys.readouterr().out
    info = probe(str(tmp_path / "out.mp4"))
    assert (info.num_frames, info.display_width, info.display_height) == (7, W, H) and info.fps == pytest.approx(12.0)
    assert cli.main([*args, "--factor", "3"]) == 2                                        # 3 does not divide 4
    assert cli.main([*args[:3], str(tmp_path / "in.mp4"), "--out", str(tmp_path / "in.mp4")]) == 2
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    assert cli.main([*args[:3], str(tmp_path / "bad.mp4"), "--out", str(tmp_path / "o2.mp4")]) == 2
    assert "cannot be read as a video" in capsys.readouterr().err and not (tmp_path / "o2.mp4").exists()


def _spec_file(clip_run, out, steps, path):
    import yaml

    doc = {"kind": "train", "data": {"shards": [clip_run]}, "output": {"path": out},
           "model": {"kind": "svd_interp"}, "video": {"buckets": {f"{H}x{W}": {F: 1}}, "fps": 15.0},
           "optim": {"lr": 1e-3}, "train": {"max_steps": steps, "checkpoint_every": 2, "log_every": 1},
           "ray": {"num_workers": 1}}
    with open(path, "w") as fh:
        yaml.safe_dump(doc, fh)
    return str(path)


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    from tests.test_train_svd import make_clip_run

    return make_clip_run(tmp_path_factory.mktemp("interp_data"))


@pytest.mark.slow
def test_interp_trains_survives_kill9_bit_for_bit_and_is_scored_against_the_blend(clip_run, tmp_path):
    from safetensors.torch import load_file

    from pipeline.commands import eval as ev
    from pipeline.synth import shot, write_video

    cmd = [sys.executable, "-m", "pipeline.cli", "train"]
    env = killable_env(ROOT)
    clean = str(tmp_path / "clean")
    done = subprocess.run([*cmd, _spec_file(clip_run, clean, 6, tmp_path / "a.yaml")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    killed = str(tmp_path / "killed")
    spec = _spec_file(clip_run, killed, 6, tmp_path / "b.yaml")
    proc = subprocess.Popen([*cmd, spec], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_at_checkpoint(proc, killed, 2)
    rerun = subprocess.run([*cmd, spec], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]

    def losses(run):      # by step: steps logged after the checkpoint and before the kill are logged again
        return {m["step"]: m["loss"] for m in map(json.loads, open(os.path.join(run, "metrics.jsonl")))}

    summary = json.load(open(os.path.join(killed, "summary.json")))
    assert summary["resumed_from"] in (2, 4) and sorted(losses(clean)) == [1, 2, 3, 4, 5, 6]
    assert losses(killed) == losses(clean)
    a, b = (load_file(os.path.join(r, "final", "unet", "diffusion_pytorch_model.safetensors")) for r in (clean, killed))
    assert all(torch.equal(a[k], b[k]) for k in a) and a["conv_in.weight"].shape[1] == 9
    assert json.load(open(os.path.join(clean, "final", "interpolation.json")))["in_channels"] == 9
    # scored on held-out clips: one at the run's 15 fps, one too slow (skipped), a file that is no video
    held = tmp_path / "held"
    held.mkdir()
    write_video(str(held / "2_a.mp4"), shot(30, W, H, 7, motion=2.0), fps=15.0, crf=18)
    write_video(str(held / "1_slow.mp4"), shot(10, W, H, 8, motion=2.0), fps=5.0, crf=18)
    (held / "0_bad.mp4").write_bytes(b"not a video")
    alex, lin = _lpips_files(tmp_path)
    res = ev.run(ev.EvalSpec(run=clean, held_out=str(held), num=3, steps=2, lpips_alexnet=alex, lpips_linear=lin),
                 log=None)
    d = res.interpolation
    assert d["model_lpips"] > 0 and d["blend_lpips"] >= 0
    assert (d["windows"], d["frames"], d["factor"]) == (3, 9, 4)
    assert set(d["skipped"]) == {"slower than the run's video.fps", "unreadable (ProbeError)"}
    assert 0 < d["model_psnr"] <= 100 and -1 <= d["model_ssim"] <= 1 and 10 < d["blend_psnr"] <= 100
    assert "linear blend PSNR" in ev.format_summary(res)
    with pytest.raises(ConfigError, match="--clips: give a folder"):
        ev.plan(ev.EvalSpec(run=clean))
    with pytest.raises(ConfigError, match="go together"):
        ev.plan(ev.EvalSpec(run=clean, held_out=str(held), lpips_alexnet=alex))
    with pytest.raises(ConfigError, match="not on prompts"):
        ev.plan(ev.EvalSpec(run=clean, held_out=str(held), prompts=str(held / "2_a.mp4")))
