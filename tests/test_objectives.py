"""The training math against diffusers' own implementations (within 1e-6)."""
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from training import objectives as obj


@pytest.fixture(scope="module")
def sched():
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g),
            torch.tensor([0, 17, 500, 999]))


def test_schedule_add_noise_and_velocity_match_diffusers(sched):
    ac = obj.alphas_cumprod()
    assert torch.allclose(ac.float(), sched.alphas_cumprod, atol=1e-6)
    x0, noise, t = batch()
    assert torch.allclose(obj.add_noise(x0, noise, t, ac), sched.add_noise(x0, noise, t), atol=1e-6)
    assert torch.allclose(obj.velocity(x0, noise, t, ac), sched.get_velocity(x0, noise, t), atol=1e-6)
    assert torch.equal(obj.target("epsilon", x0, noise, t, ac), noise)
    with pytest.raises(ValueError, match="epsilon or v_prediction"):
        obj.target("sample", x0, noise, t, ac)


def test_min_snr_weights_match_diffusers_recipe(sched):
    ac = sched.alphas_cumprod        # diffusers' float32 alphas: 1 - a cancels at t=0 in float32
    t = torch.tensor([0, 17, 500, 999])
    s = compute_snr(sched, t)
    assert torch.allclose(obj.snr(t, ac), s, rtol=1e-6)
    assert torch.allclose(obj.snr(t, obj.alphas_cumprod()).float(), s, rtol=2e-4)   # float64: exact
    # diffusers' train_text_to_image.py: min(snr, gamma) / snr, and / (snr + 1) for v
    eps = torch.stack([s, 5.0 * torch.ones_like(s)], dim=1).min(dim=1)[0] / s
    v = torch.stack([s, 5.0 * torch.ones_like(s)], dim=1).min(dim=1)[0] / (s + 1)
    assert torch.allclose(obj.min_snr_weights(t, ac, 5.0, "epsilon"), eps, atol=1e-6)
    assert torch.allclose(obj.min_snr_weights(t, ac, 5.0, "v_prediction"), v, atol=1e-6)


def test_offset_noise_is_a_per_channel_constant():
    noise = torch.zeros(2, 4, 8, 8)
    out = obj.offset_noise(noise, 0.05, torch.Generator().manual_seed(0))
    assert out.shape == noise.shape and torch.allclose(out.std(dim=(2, 3)), torch.zeros(2, 4))
    expected = 0.05 * torch.randn(2, 4, 1, 1, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out[:, :, :1, :1], expected)
    assert obj.offset_noise(noise, 0.0) is noise


def test_sdxl_time_ids_in_the_pipelines_order():
    from diffusers import StableDiffusionXLPipeline

    class Fake:      # just what _get_add_time_ids reads
        class unet:
            class config:
                addition_time_embed_dim = 8

            class add_embedding:
                class linear_1:
                    in_features = 8 * 6 + 32

    ids = StableDiffusionXLPipeline._get_add_time_ids(Fake, (1080, 1920), (0, 11), (768, 1344), torch.float32, 32)
    assert ids.tolist() == [obj.sdxl_time_ids((1080, 1920), (0, 11), (768, 1344))] == [[1080, 1920, 0, 11, 768, 1344]]


def test_caption_dropout_is_seeded():
    keep = obj.caption_keep(1000, 0.1, np.random.default_rng(0))
    assert (~keep).sum() == sum(np.random.default_rng(0).random(1000) < 0.1) and 80 < (~keep).sum() < 120
    assert obj.caption_keep(1000, 0.1, np.random.default_rng(0)).tolist() == keep.tolist()
