"""The svd family: tiny components, the image embedding as the pipeline computes it, and an export
that diffusers' StableVideoDiffusionPipeline loads and runs."""
import os

import numpy as np
import torch
from PIL import Image

from training.families import get


def test_export_loads_in_stable_video_diffusion_pipeline_and_makes_frames(tmp_path):
    from diffusers import StableVideoDiffusionPipeline

    fam = get("svd")
    comps = fam.tiny(0, str(tmp_path / "scratch"))
    folder = str(tmp_path / "svd")
    fam.export(comps, comps.unet, folder)
    assert sorted(os.listdir(folder)) == sorted(fam.subfolders + ["model_index.json"])
    pipe = StableVideoDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8))
    out = pipe(image, height=64, width=96, num_frames=4, num_inference_steps=2, decode_chunk_size=2, fps=7,
               motion_bucket_id=127, noise_aug_strength=0.02, generator=torch.Generator().manual_seed(0),
               output_type="np").frames
    assert np.asarray(out).shape == (1, 4, 64, 96, 3) and np.isfinite(np.asarray(out)).all()
    # the scheduler is SVD's: v-prediction on continuous EDM timesteps
    assert (
        pipe.scheduler.config.prediction_type == "v_prediction" and pipe.scheduler.config.timestep_type == "continuous"
    )


def test_image_embedding_is_the_pipelines(tmp_path):
    from diffusers import StableVideoDiffusionPipeline

    fam = get("svd")
    comps = fam.tiny(1, str(tmp_path))
    pipe = fam.build_pipeline(comps)
    assert isinstance(pipe, StableVideoDiffusionPipeline)
    pixels = np.random.default_rng(2).integers(0, 255, (2, 64, 96, 3), dtype=np.uint8)
    frames = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1     # the loader's [-1, 1]
    ours = fam.encode_image(comps, frames)
    theirs = pipe._encode_image([Image.fromarray(p) for p in pixels], "cpu", 1, False)
    assert ours.shape == (2, 1, 32)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_an_image_to_video_step_trains_the_temporal_layers_and_is_seeded(tmp_path):
    from training.objectives import EDM

    fam = get("svd")

    def step(seed_model: int):
        comps = fam.tiny(seed_model, str(tmp_path))
        frames = torch.rand(2, 4, 3, 64, 64, generator=torch.Generator().manual_seed(5)) * 2 - 1
        opt = torch.optim.AdamW(comps.unet.parameters(), lr=1e-3)
        losses = []
        for s in range(2):
            g = torch.Generator().manual_seed(100 + s)
            loss = fam.loss(comps, frames, torch.tensor([7.0, 6.0]), torch.tensor([127, 30]), EDM(), 0.7, 1.6, g,
                            torch.tensor([True, False]), torch.tensor([True, True])).mean()
            loss.backward()
            if s == 0:
                grads = {n: p.grad.abs().sum().item() for n, p in comps.unet.named_parameters() if p.grad is not None}
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses, grads

    losses, grads = step(0)
    assert all(np.isfinite(losses))
    assert any(v > 0 for n, v in grads.items() if "temporal_transformer_blocks" in n)
    assert any(v > 0 for n, v in grads.items() if n.startswith("add_embedding"))
    assert step(0)[0] == losses                      # same seeds, same losses, bit for bit


def test_text_to_video_family_trains_on_captions_samples_and_round_trips(tmp_path):
    from training.objectives import EDM

    fam = get("svd_t2v")
    comps = fam.tiny(0, str(tmp_path / "scratch"))
    assert comps.unet.config.in_channels == 4 and comps.unet.config.cross_attention_dim == 32
    frames = torch.rand(2, 4, 3, 64, 64, generator=torch.Generator().manual_seed(5)) * 2 - 1
    fps, motion = torch.tensor([7.0, 6.0]), torch.tensor([127, 30])

    def loss(captions, unet=None):
        return fam.loss(comps, frames, fps, motion, captions, EDM(), 0.0, 1.6, torch.Generator().manual_seed(3),
                        unet=unet)

    with_text = loss(["a red car", "a dog"])
    assert with_text.shape == (2,) and torch.equal(with_text, loss(["a red car", "a dog"]))
    # the captions reach the UNet: another caption, another loss (same noise, same sigma)
    assert not torch.equal(with_text, loss(["", "a dog"]))
    with_text.mean().backward()
    grads = {n: p.grad.abs().sum().item() for n, p in comps.unet.named_parameters() if p.grad is not None}
    assert any(v > 0 for n, v in grads.items() if "attn2" in n)           # cross-attention to the text
    comps.unet.zero_grad()

    videos = fam.generate(comps, comps.unet, ["a red car", "a dog"], 64, 96, 4, 2, 7.0,
                          generator=torch.Generator().manual_seed(0))
    assert len(videos) == 2 and [f.size for f in videos[0]] == [(96, 64)] * 4
    again = fam.generate(
        comps, comps.unet, ["a red car"], 64, 96, 4, 2, 7.0, generator=torch.Generator().manual_seed(0)
    )
    assert np.array_equal(np.asarray(again[0][3]), np.asarray(videos[0][3]))

    folder = str(tmp_path / "t2v")
    fam.export(comps, comps.unet, folder)
    assert sorted(os.listdir(folder)) == sorted(fam.subfolders + ["model_index.json"])
    fam.check_pretrained(folder)
    back = fam.load(folder)
    torch.testing.assert_close(
        loss(["a red car", "a dog"], unet=back.unet).detach(), with_text.detach(), atol=1e-6, rtol=1e-6
    )
    assert back.processors[0]("a red car").input_ids == comps.processors[0]("a red car").input_ids
