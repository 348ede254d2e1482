"""SDXL (Podell et al., 2023): two CLIP text encoders whose penultimate hidden states are
concatenated, the second one's projected pooled output, and the ``text_time`` micro-conditioning
(original size, crop top-left, target size) beside it."""
from __future__ import annotations

import os

import torch

from training.families import base
from training.families.base import Components


class SDXL(base.Family):
    name = "sdxl"
    text_encoders = ("text_encoder", "text_encoder_2")
    tiny_scaling_factor = 0.13025

    def _encoder_classes(self) -> list:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        return [CLIPTextModel, CLIPTextModelWithProjection]

    def missing_hint(self, missing: list[str]) -> str:
        return " (an SD 1.x/2.x folder? set model.kind: sd)" if "text_encoder_2" in missing else ""

    def tiny(self, seed: int, scratch: str, prediction_type: str = "epsilon") -> Components:
        """A random-weight SDXL-shaped model: both encoders, the concatenated context and the
        ``text_time`` embedding at real geometry, tiny widths."""
        from diffusers import UNet2DConditionModel

        vae = base.tiny_vae(seed, self.tiny_scaling_factor)
        torch.manual_seed(seed + 1)
        unet = UNet2DConditionModel(**base.TINY_UNET, cross_attention_dim=2 * base.TINY_TEXT_WIDTH,
                                    addition_embed_type="text_time", addition_time_embed_dim=8,
                                    projection_class_embeddings_input_dim=base.TINY_TEXT_WIDTH + 6 * 8,
                                    use_linear_projection=True)
        encoders = [base.tiny_text_encoder(False, seed + 2), base.tiny_text_encoder(True, seed + 3)]
        tokenizers = [base.offline_clip_tokenizer(os.path.join(scratch, "tokenizer")),
                      base.offline_clip_tokenizer(os.path.join(scratch, "tokenizer_2"), pad_token="!")]
        return Components(self.name, unet, vae, encoders, tokenizers, *base.tiny_schedulers(prediction_type))

    @torch.no_grad()
    def encode_text(self, c: Components, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, pooled = [], None
        for enc, tok in zip(c.encoders, c.processors, strict=True):
            out = enc(base.tokenize(tok, captions).to(device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]
        return torch.cat(hidden, dim=-1), pooled

    def unet_conditions(self, pooled: torch.Tensor, time_ids: torch.Tensor, device) -> dict:
        return {"text_embeds": pooled, "time_ids": time_ids.to(device, pooled.dtype)}

    def build_pipeline(self, c: Components, unet=None):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(vae=c.vae, text_encoder=c.encoders[0], text_encoder_2=c.encoders[1],
                                         tokenizer=c.processors[0], tokenizer_2=c.processors[1],
                                         unet=c.unet if unet is None else unet, scheduler=c.sample_scheduler)

    def _pooled(self, projection_dim: int) -> int:
        return projection_dim
