"""Stable Video Diffusion (Blattmann et al., 2023), image-to-video: a spatio-temporal UNet over
(frames x latents) with the conditioning frame's latent concatenated on channels, the frame's CLIP
image embedding as the one cross-attention token, ``[fps - 1, motion_bucket_id, noise_aug]`` as
added time ids, EDM in v-parameterisation (``training.objectives.EDM``), and a VAE whose decoder
is temporal. Exports a ``StableVideoDiffusionPipeline`` folder (``training.conditioning`` holds
the conventions, so training and the pipeline agree)."""
from __future__ import annotations

import json
import os

import torch

from training.families import base
from training.families.base import Components

TINY_IMAGE_EMBED = 32
MOTION_FILE = "motion_buckets.json"        # the run's motion-bucket map, beside the exported pipeline


def svd_scheduler():
    """The sampler SVD's released pipelines ship: Euler, v-prediction, continuous EDM timesteps, Karras sigmas."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(prediction_type="v_prediction", timestep_type="continuous", use_karras_sigmas=True,
                                  sigma_min=0.002, sigma_max=700.0, interpolation_type="linear",
                                  timestep_spacing="leading", steps_offset=1, beta_schedule="scaled_linear",
                                  beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


class SVD(base.Family):
    name = "svd"
    clips = True
    text_encoders = ()
    tiny_scaling_factor = 0.18215

    @property
    def subfolders(self) -> list[str]:
        return ["unet", "vae", "image_encoder", "feature_extractor", "scheduler"]

    def tiny(self, seed: int, scratch: str, prediction_type: str = "v_prediction", num_frames: int = 4) -> Components:
        """Random-weight SVD-shaped models: a 2-level spatio-temporal UNet (in_channels 8), a temporal-
        decoder VAE with factor 8 and 32-group norms, a tiny CLIP vision tower with projection."""
        from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

        torch.manual_seed(seed)
        vae = AutoencoderKLTemporalDecoder(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                                           block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=4,
                                           sample_size=128, scaling_factor=self.tiny_scaling_factor)
        torch.manual_seed(seed + 1)
        unet = UNetSpatioTemporalConditionModel(
            sample_size=16, in_channels=8, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal"),
            up_block_types=("CrossAttnUpBlockSpatioTemporal", "UpBlockSpatioTemporal"), num_attention_heads=(4, 8),
            cross_attention_dim=TINY_IMAGE_EMBED, addition_time_embed_dim=8, projection_class_embeddings_input_dim=24,
            num_frames=num_frames)
        torch.manual_seed(seed + 2)
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=224,
            patch_size=32, projection_dim=TINY_IMAGE_EMBED))
        processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
        sched = svd_scheduler()
        return Components(self.name, unet, vae, [encoder], [processor], sched, sched)

    def load(self, pretrained: str, allow_download: bool = False, prediction_type: str | None = None) -> Components:
        from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, UNetSpatioTemporalConditionModel
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        kw = dict(local_files_only=not allow_download)
        sched = EulerDiscreteScheduler.from_pretrained(pretrained, subfolder="scheduler", **kw)
        return Components(self.name, UNetSpatioTemporalConditionModel.from_pretrained(pretrained, subfolder="unet", **kw),
                          AutoencoderKLTemporalDecoder.from_pretrained(pretrained, subfolder="vae", **kw),
                          [CLIPVisionModelWithProjection.from_pretrained(pretrained, subfolder="image_encoder", **kw)],
                          [CLIPImageProcessor.from_pretrained(pretrained, subfolder="feature_extractor", **kw)],
                          sched, sched)

    @torch.no_grad()
    def encode_image(self, c: Components, frames: torch.Tensor) -> torch.Tensor:
        """(B, 1, D) image embeddings of the clean conditioning frames (B, 3, H, W in [-1, 1]), computed
        as the pipeline computes them: antialiased resize to 224, CLIP normalisation, projected embeds."""
        from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import _resize_with_antialiasing

        proc, enc = c.tokenizers[0], c.text_encoders[0]
        x = _resize_with_antialiasing(frames.float(), (224, 224))
        x = (x + 1.0) / 2.0
        mean = torch.tensor(proc.image_mean, device=x.device).reshape(1, 3, 1, 1)
        std = torch.tensor(proc.image_std, device=x.device).reshape(1, 3, 1, 1)
        x = (x - mean) / std
        return enc(x.to(next(enc.parameters()).dtype)).image_embeds.unsqueeze(1)

    def encode_text(self, c: Components, captions: list[str], device):
        raise TypeError("svd is image-conditioned: use encode_image on the conditioning frame")

    def unet_conditions(self, pooled, time_ids, device):
        return None               # SVD passes added_time_ids directly (training.conditioning.svd_time_ids)

    def build_pipeline(self, c: Components, unet=None):
        from diffusers import StableVideoDiffusionPipeline

        return StableVideoDiffusionPipeline(vae=c.vae, image_encoder=c.text_encoders[0],
                                            unet=c.unet if unet is None else unet, scheduler=c.sample_scheduler,
                                            feature_extractor=c.tokenizers[0])

    def export(self, c: Components, unet, folder: str, motion_map=None) -> str:
        """The pipeline folder, plus the run's motion-bucket map (``motion_buckets.json``) when given."""
        super().export(c, unet, folder)
        if motion_map is not None:
            with open(os.path.join(folder, MOTION_FILE), "w", encoding="utf-8") as fh:
                json.dump(motion_map.to_dict(), fh, indent=1)
        return folder

    def loss(self, c: Components, frames: torch.Tensor, fps: torch.Tensor, motion_bucket_id: torch.Tensor, edm,
             p_mean: float, p_std: float, g: torch.Generator, keep_image: torch.Tensor, keep_concat: torch.Tensor,
             unet=None) -> torch.Tensor:
        """Per-video EDM loss of one image-to-video batch. ``frames`` (B, F, 3, H, W) in [-1, 1]; the
        first frame conditions; ``keep_image`` / ``keep_concat`` (B,) bool drop the image embedding and
        the concatenated latent for classifier-free guidance (to zeros, the pipeline's negatives)."""
        from training.conditioning import augment_frame, concat_condition, sample_noise_aug, svd_time_ids
        from training.objectives import sample_sigmas

        unet = c.unet if unet is None else unet
        b, f = frames.shape[:2]
        device = frames.device
        vae = c.vae
        with torch.no_grad():
            dist = vae.encode(frames.flatten(0, 1).to(next(vae.parameters()).dtype)).latent_dist
            noise_z = torch.randn(dist.mean.shape, generator=g).to(device, dist.mean.dtype)
            latents = ((dist.mean + dist.std * noise_z) * vae.config.scaling_factor).float().unflatten(0, (b, f))
            first = frames[:, 0]
            embeds = self.encode_image(c, first) * keep_image.to(device, torch.float32).reshape(-1, 1, 1)
            aug = sample_noise_aug(b, generator=g).to(device)
            cond = augment_frame(first, aug, torch.randn(first.shape, generator=g).to(device, first.dtype))
            cond_latent = vae.encode(cond.to(next(vae.parameters()).dtype)).latent_dist.mode().float()
            cond_latent = cond_latent * keep_concat.to(device, torch.float32).reshape(-1, 1, 1, 1)
        sigma = sample_sigmas(b, p_mean, p_std, g).to(device)
        noisy = edm.noisy(latents, torch.randn(latents.shape, generator=g).to(device), sigma)
        model_in = concat_condition(edm.model_input(noisy, sigma), cond_latent)
        out = unet(model_in, edm.c_noise(sigma), embeds, added_time_ids=svd_time_ids(fps, motion_bucket_id, aug).to(device)).sample
        return edm.loss(noisy, out, latents, sigma)

    def cache_dims(self, pretrained, allow_download=False) -> dict:
        raise TypeError("the latent cache holds image latents; svd trains on decoded frames")


__all__ = ["MOTION_FILE", "SVD", "svd_scheduler"]
