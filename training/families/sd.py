"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, its last hidden state as the context."""
from __future__ import annotations

import os

import torch

from training.families import base
from training.families.base import Components


class SD(base.Family):
    name = "sd"
    inflates = True
    text_encoders = ("text_encoder",)
    tiny_scaling_factor = 0.18215

    def _encoder_classes(self) -> list:
        from transformers import CLIPTextModel

        return [CLIPTextModel]

    def tiny(self, seed: int, scratch: str, prediction_type: str = "epsilon") -> Components:
        """A random-weight SD-shaped model small enough to train on a laptop CPU: real geometry
        (VAE factor 8, 4 latent channels, CLIP's tokenizer and 77 tokens), tiny widths."""
        from diffusers import UNet2DConditionModel

        vae = base.tiny_vae(seed, self.tiny_scaling_factor)
        torch.manual_seed(seed + 1)
        unet = UNet2DConditionModel(**base.TINY_UNET, cross_attention_dim=base.TINY_TEXT_WIDTH)
        encoders = [base.tiny_text_encoder(False, seed + 2)]
        tokenizers = [base.offline_clip_tokenizer(os.path.join(scratch, "tokenizer"))]
        return Components(self.name, unet, vae, encoders, tokenizers, *base.tiny_schedulers(prediction_type))

    def encode_text(self, c: Components, captions: list[str], device) -> tuple[torch.Tensor, None]:
        return base.text_context(c, captions, device), None

    def build_pipeline(self, c: Components, unet=None):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(vae=c.vae, text_encoder=c.encoders[0], tokenizer=c.processors[0],
                                       unet=c.unet if unet is None else unet, scheduler=c.sample_scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
