"""Stable Video Diffusion (Blattmann et al., 2023), image-to-video: a spatio-temporal UNet over
(frames x latents) with the conditioning frame's latent concatenated on channels, the frame's CLIP
image embedding as the one cross-attention token, ``[fps - 1, motion_bucket_id, noise_aug]`` as
added time ids, EDM in v-parameterisation (``training.objectives.EDM``), and a VAE whose decoder
is temporal. Exports a ``StableVideoDiffusionPipeline`` folder (``training.conditioning`` holds
the conventions, so training and the pipeline agree)."""
from __future__ import annotations

import json
import os
from typing import ClassVar

import torch

from training.families import base
from training.families.base import Components

TINY_IMAGE_EMBED = 32


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
    follows = ("svd_t2v",)
    image_conditioned = True         # a text-to-video stage's UNet widens into this one (conv_in 4 -> 8)
    text_encoders = ()
    tiny_scaling_factor = 0.18215

    @property
    def subfolders(self) -> list[str]:
        return ["unet", "vae", "image_encoder", "feature_extractor", "scheduler"]

    in_channels: ClassVar[int] = 8         # noisy latents + the conditioning frame's latent

    def tiny_unet(self, seed: int, num_frames: int, cross_attention_dim: int):
        """A random 2-level spatio-temporal UNet with ``self.in_channels`` inputs."""
        from diffusers import UNetSpatioTemporalConditionModel

        torch.manual_seed(seed)
        return UNetSpatioTemporalConditionModel(
            sample_size=16,
            in_channels=self.in_channels,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal"),
            up_block_types=("CrossAttnUpBlockSpatioTemporal", "UpBlockSpatioTemporal"),
            num_attention_heads=(4, 8),
            cross_attention_dim=cross_attention_dim,
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=24,
            num_frames=num_frames,
        )

    def tiny_vae(self, seed: int):
        """A random temporal-decoder VAE with factor 8 and 32-group norms."""
        from diffusers import AutoencoderKLTemporalDecoder

        torch.manual_seed(seed)
        return AutoencoderKLTemporalDecoder(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                                            block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=4,
                                            sample_size=128, scaling_factor=self.tiny_scaling_factor)

    def tiny(self, seed: int, scratch: str, prediction_type: str = "v_prediction", num_frames: int = 4) -> Components:
        """Random-weight SVD-shaped models: a 2-level spatio-temporal UNet (in_channels 8), a temporal-
        decoder VAE with factor 8 and 32-group norms, a tiny CLIP vision tower with projection."""
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

        vae = self.tiny_vae(seed)
        unet = self.tiny_unet(seed + 1, num_frames, TINY_IMAGE_EMBED)
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
        return Components(
            self.name,
            UNetSpatioTemporalConditionModel.from_pretrained(pretrained, subfolder="unet", **kw),
            AutoencoderKLTemporalDecoder.from_pretrained(pretrained, subfolder="vae", **kw),
            [CLIPVisionModelWithProjection.from_pretrained(pretrained, subfolder="image_encoder", **kw)],
            [CLIPImageProcessor.from_pretrained(pretrained, subfolder="feature_extractor", **kw)],
            sched,
            sched,
        )

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

    @torch.no_grad()
    def frame_latents(self, c: Components, frames: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """(B, F, C, h, w) scaled VAE latents (a posterior sample) of ``frames`` (B, F, 3, H, W)."""
        b, f = frames.shape[:2]
        dist = c.vae.encode(frames.flatten(0, 1).to(next(c.vae.parameters()).dtype)).latent_dist
        noise_z = torch.randn(dist.mean.shape, generator=g).to(frames.device, dist.mean.dtype)
        return ((dist.mean + dist.std * noise_z) * c.vae.config.scaling_factor).float().unflatten(0, (b, f))

    def step_loss(
        self, c: Components, frames: torch.Tensor, batch, spec, g: torch.Generator, keep, unet
    ) -> torch.Tensor:
        """The training step's per-video loss: ``keep(name, p)`` is the seeded (B,) keep-mask of one
        classifier-free-guidance drop."""
        from training.objectives import EDM

        v = spec.video
        return self.loss(c, frames, batch.fps, batch.motion_bucket_id, EDM(v.sigma_data), v.p_mean, v.p_std, g,
                         keep("image", v.image_dropout), keep("concat", v.concat_dropout), unet=unet,
                         aug_mean=v.noise_aug_mean, aug_std=v.noise_aug_std)

    def loss(self, c: Components, frames: torch.Tensor, fps: torch.Tensor, motion_bucket_id: torch.Tensor, edm,
             p_mean: float, p_std: float, g: torch.Generator, keep_image: torch.Tensor, keep_concat: torch.Tensor,
             unet=None, aug_mean: float = -3.0, aug_std: float = 0.5) -> torch.Tensor:
        """Per-video EDM loss of one image-to-video batch. ``frames`` (B, F, 3, H, W) in [-1, 1]; the
        first frame conditions; ``keep_image`` / ``keep_concat`` (B,) bool drop the image embedding and
        the concatenated latent for classifier-free guidance (to zeros, the pipeline's negatives)."""
        from training.conditioning import augment_frame, concat_condition, sample_noise_aug, svd_time_ids
        from training.objectives import sample_sigmas

        unet = c.unet if unet is None else unet
        b = frames.shape[0]
        device = frames.device
        vae = c.vae
        latents = self.frame_latents(c, frames, g)
        with torch.no_grad():
            first = frames[:, 0]
            embeds = self.encode_image(c, first) * keep_image.to(device, torch.float32).reshape(-1, 1, 1)
            aug = sample_noise_aug(b, aug_mean, aug_std, generator=g).to(device)
            cond = augment_frame(first, aug, torch.randn(first.shape, generator=g).to(device, first.dtype))
            cond_latent = vae.encode(cond.to(next(vae.parameters()).dtype)).latent_dist.mode().float()
            cond_latent = cond_latent * keep_concat.to(device, torch.float32).reshape(-1, 1, 1, 1)
        sigma = sample_sigmas(b, p_mean, p_std, g).to(device)
        noisy = edm.noisy(latents, torch.randn(latents.shape, generator=g).to(device), sigma)
        model_in = concat_condition(edm.model_input(noisy, sigma), cond_latent)
        out = unet(
            model_in, edm.c_noise(sigma), embeds, added_time_ids=svd_time_ids(fps, motion_bucket_id, aug).to(device)
        ).sample
        return edm.loss(noisy, out, latents, sigma)

    def sample_videos(self, c: Components, unet, bucket, steps: int, fps: float, seed: int, device, prompts: list[str],
                      first_frame) -> list[list]:
        """Sample videos for the run's samples/: ``first_frame()`` (a PIL image) through the exported
        pipeline, at the run's fps and the median motion bucket 127."""
        pipe = self.build_pipeline(c, unet).to(device)
        pipe.set_progress_bar_config(disable=True)
        g = torch.Generator("cpu").manual_seed(seed)
        return [pipe(first_frame(), height=bucket.height, width=bucket.width, num_frames=bucket.frames,
                     num_inference_steps=steps, fps=round(fps), motion_bucket_id=127, decode_chunk_size=bucket.frames,
                     generator=g).frames[0]]

    def cache_dims(self, pretrained, allow_download=False) -> dict:
        raise TypeError("the latent cache holds image latents; svd trains on decoded frames")


class SVDText(SVD):
    """Text-to-video, the SVD paper's video pretraining and fine-tuning stages (sec. 3.2-3.3): the
    same spatio-temporal UNet with in_channels 4 (no concatenated frame), the CLIP text encoder's
    last hidden state as cross-attention context (as the image model it was inflated from), the
    same EDM objective and ``[fps - 1, motion_bucket_id, 0]`` time ids. No diffusers pipeline runs
    this model: the export is a folder of its parts (``model_index.json`` names them) that winnow
    samples with its own Euler loop (``sample_videos``) and that an image-to-video stage starts from."""
    name = "svd_t2v"
    in_channels = 4
    image_conditioned = False
    text_encoders = ("text_encoder",)
    follows = ()

    @property
    def subfolders(self) -> list[str]:
        return ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]

    def tiny(self, seed: int, scratch: str, prediction_type: str = "v_prediction", num_frames: int = 4) -> Components:
        """The svd preset's VAE and UNet (in_channels 4, text-width context) and the sd preset's text
        encoder and offline CLIP tokenizer."""
        vae = self.tiny_vae(seed)
        unet = self.tiny_unet(seed + 1, num_frames, base.TINY_TEXT_WIDTH)
        encoder = base.tiny_text_encoder(False, seed + 2)
        tokenizer = base.offline_clip_tokenizer(os.path.join(scratch, "tokenizer"))
        sched = svd_scheduler()
        return Components(self.name, unet, vae, [encoder], [tokenizer], sched, sched)

    def load(self, pretrained: str, allow_download: bool = False, prediction_type: str | None = None) -> Components:
        from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, UNetSpatioTemporalConditionModel

        kw = dict(local_files_only=not allow_download)
        sched = EulerDiscreteScheduler.from_pretrained(pretrained, subfolder="scheduler", **kw)
        encoders, tokenizers = [], []
        if not os.path.isdir(pretrained) or os.path.isdir(os.path.join(pretrained, "text_encoder")):
            encoder, tokenizer = self._text_parts(pretrained, **kw)
            encoders, tokenizers = [encoder], [tokenizer]
        # else: an SVD release folder (no text encoder) as a curriculum stage's source of the VAE,
        # scheduler and UNet geometry; the text encoder is the inflated image model's (``inherit``)
        return Components(
            self.name,
            UNetSpatioTemporalConditionModel.from_pretrained(pretrained, subfolder="unet", **kw),
            AutoencoderKLTemporalDecoder.from_pretrained(pretrained, subfolder="vae", **kw),
            encoders,
            tokenizers,
            sched,
            sched,
        )

    def missing_hint(self, missing: list[str]) -> str:
        return ("; a curriculum's text-to-video stage with init: previous may point model.pretrained at an SVD "
                "release (its VAE and scheduler) and takes the text encoder from the image stage"
                if "text_encoder" in missing else "")

    @staticmethod
    def _text_parts(folder: str, **kw):
        from transformers import CLIPTextModel, CLIPTokenizer

        return (CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **kw),
                CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", **kw))

    def inherit(self, c: Components, image_pipeline: str) -> list[str]:
        """Take the text encoder and tokenizer of the image pipeline this model was inflated from:
        the inflated UNet's cross-attention was trained on that encoder's context."""
        encoder, tokenizer = self._text_parts(image_pipeline, local_files_only=True)
        width = c.unet.config.cross_attention_dim
        if encoder.config.hidden_size != width:
            raise ValueError(f"the image pipeline's text encoder is {encoder.config.hidden_size} wide, the video UNet "
                             f"attends to {width}")
        c.text_encoders, c.tokenizers = [encoder], [tokenizer]
        return ["text_encoder", "tokenizer"]

    def encode_text(self, c: Components, captions: list[str], device):
        return base.text_context(c, captions, device), None

    def encode_image(self, c: Components, frames: torch.Tensor) -> torch.Tensor:
        raise TypeError("svd_t2v is text-conditioned: use encode_text on the captions")

    def step_loss(
        self, c: Components, frames: torch.Tensor, batch, spec, g: torch.Generator, keep, unet
    ) -> torch.Tensor:
        from training.objectives import EDM

        v = spec.video
        kept = keep("captions", spec.objective.caption_dropout)
        return self.loss(
            c,
            frames,
            batch.fps,
            batch.motion_bucket_id,
            [t if k else "" for t, k in zip(batch.captions, kept, strict=True)],
            EDM(v.sigma_data),
            v.p_mean,
            v.p_std,
            g,
            unet=unet,
        )

    def loss(self, c: Components, frames: torch.Tensor, fps: torch.Tensor, motion_bucket_id: torch.Tensor,
             captions: list[str], edm, p_mean: float, p_std: float, g: torch.Generator, unet=None) -> torch.Tensor:
        """Per-video EDM loss of one text-to-video batch: ``frames`` (B, F, 3, H, W) in [-1, 1], the
        captions' context (a dropped caption is ``""``, as the image model's CFG), one sigma per video."""
        from training.conditioning import svd_time_ids
        from training.objectives import sample_sigmas

        unet = c.unet if unet is None else unet
        b, device = frames.shape[0], frames.device
        latents = self.frame_latents(c, frames, g)
        context = self.encode_text(c, captions, device)[0].to(next(unet.parameters()).dtype)
        sigma = sample_sigmas(b, p_mean, p_std, g).to(device)
        noisy = edm.noisy(latents, torch.randn(latents.shape, generator=g).to(device), sigma)
        time_ids = svd_time_ids(fps, motion_bucket_id, torch.zeros(b)).to(device)
        out = unet(edm.model_input(noisy, sigma), edm.c_noise(sigma), context, added_time_ids=time_ids).sample
        return edm.loss(noisy, out, latents, sigma)

    @torch.no_grad()
    def generate(self, c: Components, unet, prompts: list[str], height: int, width: int, num_frames: int, steps: int,
                 fps: float, motion_bucket_id: int = 127, guidance_scale: float = 3.0, generator=None,
                 device="cpu") -> list[list]:
        """Text-to-video sampling with SVD's Euler scheduler (the ``StableVideoDiffusionPipeline`` loop
        with text context in place of the image embedding and no concatenated frame), classifier-free
        guidance against the empty caption. Returns one list of PIL frames per prompt."""
        from diffusers import EulerDiscreteScheduler
        from PIL import Image

        from training.conditioning import svd_time_ids

        sched = EulerDiscreteScheduler.from_config(c.sample_scheduler.config)
        dtype = next(unet.parameters()).dtype
        videos = []
        for prompt in prompts:
            sched.set_timesteps(steps, device=device)          # also resets the step index
            context, _ = self.encode_text(c, ["", prompt], device)
            ids = svd_time_ids(torch.tensor([float(fps)] * 2), torch.tensor([motion_bucket_id] * 2), torch.zeros(2))
            shape = (1, num_frames, unet.config.out_channels, height // 8, width // 8)
            latents = torch.randn(shape, generator=generator).to(device) * sched.init_noise_sigma
            for t in sched.timesteps:
                x = sched.scale_model_input(torch.cat([latents, latents]), t)
                out = unet(x.to(dtype), t, context.to(dtype), added_time_ids=ids.to(device, dtype)).sample.float()
                uncond, cond = out.chunk(2)
                latents = sched.step(uncond + guidance_scale * (cond - uncond), t, latents).prev_sample
            vae = c.vae
            frames = vae.decode((latents.flatten(0, 1) / vae.config.scaling_factor).to(next(vae.parameters()).dtype),
                                num_frames=num_frames).sample.float()
            pixels = ((frames.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            videos.append([Image.fromarray(p) for p in pixels])
        return videos

    def sample_videos(self, c: Components, unet, bucket, steps: int, fps: float, seed: int, device, prompts: list[str],
                      first_frame) -> list[list]:
        g = torch.Generator("cpu").manual_seed(seed)
        return self.generate(c, unet, prompts, bucket.height, bucket.width, bucket.frames, steps, fps, generator=g,
                             device=device)

    def build_pipeline(self, c: Components, unet=None):
        raise TypeError("no diffusers pipeline runs svd_t2v; winnow samples it with SVDText.generate")

    def export(self, c: Components, unet, folder: str) -> str:
        """A folder of the parts (``model_index.json`` lists them)."""
        import diffusers

        os.makedirs(folder, exist_ok=True)
        parts = {"unet": unet, "vae": c.vae, "text_encoder": c.text_encoders[0], "tokenizer": c.tokenizers[0],
                 "scheduler": c.sample_scheduler}
        index = {"_class_name": "WinnowTextToVideo", "_diffusers_version": diffusers.__version__}
        for sub, part in parts.items():
            part.save_pretrained(os.path.join(folder, sub),
                                 **({"safe_serialization": True} if isinstance(part, torch.nn.Module) else {}))
            index[sub] = ["transformers" if sub in ("text_encoder", "tokenizer") else "diffusers", type(part).__name__]
        with open(os.path.join(folder, "model_index.json"), "w", encoding="utf-8") as fh:
            json.dump(index, fh, indent=1)
        return folder


__all__ = ["SVD", "SVDText", "svd_scheduler"]
