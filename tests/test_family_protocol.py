"""The family protocol on tiny models: the image loss is one function that training and validation
both call, checked against diffusers' own scheduler; the worker's step sees only the protocol."""
import pytest
import torch

from training.families import get
from training.families.base import StepContext
from training.loader import Batch
from training.train_spec import parse


def _spec(kind: str, **objective):
    return parse({"data": {"shards": ["/nonexistent"], "resolution": 64, "bucket_step": 32},
                  "model": {"kind": kind}, "objective": objective, "output": {"path": "/nonexistent/out"}},
                 check_paths=False)


def _batch(n: int = 2, size: int = 64) -> Batch:
    g = torch.Generator().manual_seed(1)
    pixels = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    time_ids = torch.tensor([[size, size, 0, 0, size, size]] * n, dtype=torch.float32)
    return Batch(pixels, ["a red car", "a dog"][:n], time_ids, list(range(n)), 0, 0)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_training_and_validation_share_one_image_loss(kind, tmp_path):
    from diffusers import DDPMScheduler

    fam = get(kind)
    spec = _spec(kind)
    comps = fam.tiny(0, str(tmp_path))
    ctx = StepContext(spec, comps, "cpu")
    batch = _batch()
    keep = torch.ones(2, dtype=torch.bool)

    # denoising_loss is the MSE of the UNet's prediction against diffusers' own noising and target
    latents, context, pooled = fam.latents(ctx, batch, keep, torch.Generator().manual_seed(3))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([10, 700])
    added = fam.unet_conditions(pooled, batch.time_ids, "cpu")
    got = fam.denoising_loss(ctx, comps.unet, latents, noise, t, context, added)
    sched = DDPMScheduler.from_config(comps.noise_scheduler.config)
    noisy = sched.add_noise(latents, noise, t)
    target = noise if comps.prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
    with torch.no_grad():
        pred = comps.unet(noisy, t, context, added_cond_kwargs=added).sample
    want = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    assert got.shape == (2,)
    torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)      # float32, the same ops reordered

    # validation: the same function at eight fixed timesteps, the same draws on every pass
    with torch.no_grad():
        a = fam.validation_loss(ctx, batch, torch.Generator().manual_seed(5), comps.unet)
        b = fam.validation_loss(ctx, batch, torch.Generator().manual_seed(5), comps.unet)
    assert a.shape == (2, 8) and torch.equal(a, b)

    # a training step: one loss per sample, seeded by its generator, dropped captions through keep()
    def keep_all(name, p):
        assert name == "captions" and p == spec.objective.caption_dropout
        return torch.ones(2, dtype=torch.bool)

    s1 = fam.step_loss(ctx, batch, torch.Generator().manual_seed(6), keep_all, comps.unet)
    s2 = fam.step_loss(ctx, batch, torch.Generator().manual_seed(6), keep_all, comps.unet)
    assert s1.shape == (2,) and torch.equal(s1, s2) and bool(torch.isfinite(s1).all())


def test_a_dropped_caption_is_the_empty_caption(tmp_path):
    fam = get("sd")
    comps = fam.tiny(0, str(tmp_path))
    ctx = StepContext(_spec("sd"), comps, "cpu")
    batch = _batch()
    _, dropped, _ = fam.latents(ctx, batch, torch.tensor([False, True]), torch.Generator().manual_seed(0))
    empty, _ = fam.encode_text(comps, ["", "a dog"], "cpu")
    torch.testing.assert_close(dropped, empty.to(dropped.dtype))


def test_what_the_driver_asks_differs_by_family_not_by_branching():
    sd, svd, t2v = get("sd"), get("svd"), get("svd_t2v")
    lora = _spec("sd").lora
    assert (sd.lora_layers(lora), svd.lora_layers(lora), t2v.lora_layers(lora)) == ("all", "temporal", "temporal")
    assert (sd.spec_sections(), svd.spec_sections()) == ((), ("video",))
    from pipeline.contract.config import ConfigError
    from training.families import transition

    assert transition(sd, t2v, "stages[1]") == "inflate" and transition(t2v, svd, "stages[2]") == "widen"
    assert transition(svd, svd, "stages[3]", carry=True) == "same"
    with pytest.raises(ConfigError, match=r"stages\[1\]: init: previous cannot turn a video model back"):
        transition(svd, sd, "stages[1]")
    with pytest.raises(ConfigError, match="--frames: model.kind sd samples from prompts alone"):
        sd.check_generate(True)
    with pytest.raises(ConfigError, match=r"--frames: an image-to-video run \(model.kind svd\)"):
        svd.check_generate(False)
    t2v.check_generate(False)
    sd.check_generate(False)
