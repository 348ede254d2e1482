"""Inflation: the video UNet (and temporal-decoder VAE) starts as the image model frame by frame."""
import json
import os
import subprocess
import sys

import pytest
import torch

from training.families.base import TINY_UNET
from training.inflate import InflationError, inflate_unet, inflate_vae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def image_unet(linear: bool, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET, cross_attention_dim=32, use_linear_projection=linear).eval()
    with torch.no_grad():                 # move every weight off diffusers' init (zeros would hide a bad map)
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return unet


def frames_through_both(unet, video, in_channels: int, frames: int = 4):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, frames, 4, 16, 16, generator=g)
    cond = torch.randn(2, frames, in_channels - 4, 16, 16, generator=g)
    enc = torch.randn(2, 1, 32, generator=g)
    t = torch.tensor(321.0)
    with torch.no_grad():
        out_v = video(torch.cat([x, cond], 2), t, enc, added_time_ids=torch.tensor([[6.0, 127.0, 0.02]] * 2)).sample
        out_i = unet(x.flatten(0, 1), t, enc.repeat_interleave(frames, 0)).sample.unflatten(0, (2, frames))
    return out_v, out_i


@pytest.mark.parametrize("linear", [True, False], ids=["sd2-linear-proj", "sd1-conv-proj"])
@pytest.mark.parametrize("in_channels", [4, 8])
def test_inflated_unet_is_the_image_unet_on_every_frame(linear, in_channels):
    unet = image_unet(linear)
    video, report = inflate_unet(unet, in_channels, num_frames=4, addition_time_embed_dim=8)
    assert len(report["mapped"]) == len(unet.state_dict()) and report["unused"] == []
    assert all(("temporal" in k or "time_" in k or k.startswith("add_embedding")) for k in report["new"])
    video.eval()
    out_v, out_i = frames_through_both(unet, video, in_channels)
    # as shipped: SVD's mid/up resnets normalise with eps 1e-6 where SD's use 1e-5
    assert (out_v - out_i).abs().max() < 1e-4
    for name, m in video.named_modules():          # with SD's eps the two are the same function
        if isinstance(m, torch.nn.GroupNorm) and "spatial_res_block" in name:
            m.eps = 1e-5
    out_v, out_i = frames_through_both(unet, video, in_channels)
    assert (out_v - out_i).abs().max() < 1e-5
    # the extra input channels and the added time ids start without effect
    assert video.conv_in.weight[:, 4:].abs().sum() == 0 and video.add_embedding.linear_2.weight.abs().sum() == 0


def test_sdxl_and_unknown_layouts_are_refused_not_dropped():
    from diffusers import UNet2DConditionModel

    sdxl = UNet2DConditionModel(**TINY_UNET, cross_attention_dim=64, addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=80)
    with pytest.raises(InflationError, match="addition_embed_type='text_time'.*inflate an SD 1.x or 2.x UNet"):
        inflate_unet(sdxl)
    odd = UNet2DConditionModel(**{**TINY_UNET, "norm_num_groups": 16}, cross_attention_dim=32)
    with pytest.raises(InflationError, match="norm_num_groups=16"):
        inflate_unet(odd)


def _image_vae(pq_bias: float):
    from diffusers import AutoencoderKL

    torch.manual_seed(2)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=2,
                        latent_channels=4, sample_size=64, norm_num_groups=32).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        vae.post_quant_conv.bias.fill_(pq_bias)
    return vae


def test_inflated_vae_decodes_every_frame_as_the_image_vae():
    vae = _image_vae(0.0)
    video, report = inflate_vae(vae)
    video.eval()
    assert report["unused"] == [] and report["post_quant_conv_bias_norm"] == 0.0
    z = torch.randn(6, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (vae.decode(z).sample - video.decode(z, num_frames=3).sample).abs().max() < 1e-5
        # encoder copied: equal weights in another instance (kernels may sum in another order, float32)
        torch.testing.assert_close(
            vae.encode(x).latent_dist.mean, video.encode(x).latent_dist.mean, atol=1e-6, rtol=1e-5
        )
    # a post_quant_conv bias shows at the latent border, in proportion (documented in training/inflate.py)
    vae = _image_vae(0.01)
    video, report = inflate_vae(vae)
    with torch.no_grad():
        diff = (vae.decode(z).sample - video.eval().decode(z, num_frames=3).sample).abs().max()
    assert report["post_quant_conv_bias_norm"] == pytest.approx(0.02) and 1e-4 < diff < 0.05


def test_winnow_inflate_writes_a_folder_diffusers_loads(tmp_path):
    from diffusers import StableDiffusionPipeline, UNetSpatioTemporalConditionModel

    from training.families import get

    comps = get("sd").tiny(0, str(tmp_path / "scratch"))
    pipe_dir = str(tmp_path / "sd")
    get("sd").export(comps, comps.unet, pipe_dir)
    StableDiffusionPipeline.from_pretrained(pipe_dir)            # a real pipeline folder
    out = str(tmp_path / "svd_unet")
    env = {**os.environ, "PYTHONPATH": ROOT}
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "inflate", pipe_dir, out, "--num-frames", "6"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "mapped" in res.stdout and "0 unused" in res.stdout
    unet = UNetSpatioTemporalConditionModel.from_pretrained(out)
    assert unet.config.in_channels == 8 and unet.config.num_frames == 6
    info = json.load(open(os.path.join(out, "inflation.json")))
    assert info["unused"] == [] and info["counts"]["mapped"] == len(comps.unet.state_dict())
    # the pipeline's VAE became a temporal decoder that diffusers loads
    from diffusers import AutoencoderKLTemporalDecoder

    assert info["vae"]["counts"]["unused"] == 0
    assert AutoencoderKLTemporalDecoder.from_pretrained(os.path.join(out, "vae")).config.latent_channels == 4
    again = subprocess.run([sys.executable, "-m", "pipeline.cli", "inflate", pipe_dir, out], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "exists and is not empty" in again.stderr
    # a VAE with 16-channel groups has no temporal-decoder form: said, not hidden; the UNet still inflates
    from diffusers import AutoencoderKL

    comps.vae = AutoencoderKL(
        latent_channels=4,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=16,
    )
    get("sd").export(comps, comps.unet, str(tmp_path / "sd16"))
    res = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "inflate", str(tmp_path / "sd16"), str(tmp_path / "o16")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    info = json.load(open(str(tmp_path / "o16" / "inflation.json")))
    assert info["vae"] == {"skipped": "norm_num_groups=16: SVD's temporal decoder has 32 groups"}
    assert "vae   not inflated: norm_num_groups=16" in res.stdout and info["counts"]["unused"] == 0


def test_a_text_to_video_unet_widens_to_image_to_video_and_ignores_the_new_channels_at_init():
    from training.families import get
    from training.inflate import widen_video_unet

    t2v = get("svd_t2v").tiny_unet(3, 4, 32).eval()
    with torch.no_grad():
        for p in t2v.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    i2v, report = widen_video_unet(t2v, 8)
    assert i2v.config.in_channels == 8 and report["new"] == [] and len(report["mapped"]) == len(t2v.state_dict())
    g = torch.Generator().manual_seed(2)
    x, cond = torch.randn(2, 4, 4, 16, 16, generator=g), torch.randn(2, 4, 4, 16, 16, generator=g)
    enc, ids = torch.randn(2, 7, 32, generator=g), torch.tensor([[6.0, 127.0, 0.0]] * 2)
    with torch.no_grad():
        a = t2v(x, torch.tensor(0.3), enc, added_time_ids=ids).sample
        b = i2v.eval()(torch.cat([x, cond], 2), torch.tensor(0.3), enc, added_time_ids=ids).sample
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)     # exact here; kernels may sum in another order
    with pytest.raises(InflationError, match="never narrowed"):
        widen_video_unet(i2v, 4)
