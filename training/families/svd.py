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

from pipeline.contract.config import ConfigError
from training import captions
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
    follows = ("svd_t2v",)           # a text-to-video stage's UNet widens into this one (conv_in 4 -> 8)
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

        proc, enc = c.processors[0], c.encoders[0]
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

        return StableVideoDiffusionPipeline(vae=c.vae, image_encoder=c.encoders[0],
                                            unet=c.unet if unet is None else unet, scheduler=c.sample_scheduler,
                                            feature_extractor=c.processors[0])

    @torch.no_grad()
    def frame_latents(self, c: Components, frames: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """(B, F, C, h, w) scaled VAE latents (a posterior sample) of ``frames`` (B, F, 3, H, W)."""
        b, f = frames.shape[:2]
        dist = c.vae.encode(frames.flatten(0, 1).to(next(c.vae.parameters()).dtype)).latent_dist
        noise_z = torch.randn(dist.mean.shape, generator=g).to(frames.device, dist.mean.dtype)
        return ((dist.mean + dist.std * noise_z) * c.vae.config.scaling_factor).float().unflatten(0, (b, f))

    def _batch_loss(self, c: Components, frames: torch.Tensor, batch, spec, g: torch.Generator, keep,
                    unet) -> torch.Tensor:
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

    # ---- the run: curated clips in video buckets (WxHxframes, a batch size per bucket) ----
    def plan_buckets(self, spec, index):
        from training.index import clip_bucket_ids

        buckets, bucket_of = clip_bucket_ids(index, spec.video)
        sizes = [b.batch * spec.ray.num_workers for b in buckets]
        return buckets, bucket_of, sizes, [f"{b.width}x{b.height}x{b.frames}" for b in buckets]

    def prepare_run(self, spec, index, bucket_of) -> list[str]:
        """Fit the motion-bucket map on the clips this run trains on (OUTPUT/motion_buckets.json: the
        workers read it, the export carries it; a resumed run keeps the map it started with)."""
        import numpy as np

        from pipeline.contract import storage
        from pipeline.contract.layout import TrainRun, atomic_write
        from training.conditioning import MotionBucketMap

        path = TrainRun(spec.output.path).motion
        if not storage.exists(path):
            scores = index.column("motion_score").to_numpy(zero_copy_only=False)[np.asarray(bucket_of) >= 0]
            try:
                m = MotionBucketMap.fit(scores)          # nulls arrive as NaN; fit keeps the finite scores
            except ValueError:
                raise ConfigError("data.shards: the clips have no motion_score; curate them with the motion stage "
                                  "(jobs/lvd_video_curation.yaml) so motion_bucket_id can be conditioned on") from None
            atomic_write(path, json.dumps(m.to_dict(), indent=1).encode())
        notes = []
        slow = np.asarray(index.column("fps").to_numpy()) < spec.video.min_fps
        if slow.any():
            notes.append(f"{int(slow.sum())} clips are slower than video.min_fps {spec.video.min_fps:g} and are "
                         f"skipped (fps_too_low)")
        if ((bucket_of < 0) & ~slow).any():
            notes.append(f"{int(((bucket_of < 0) & ~slow).sum())} clips are too short for any video bucket at up "
                         f"to video.max_fps {spec.video.max_fps:g} and are skipped (too_short)")
        return notes

    def describe_plan(self, spec, buckets: int, global_batch: int) -> str:
        from pipeline.contract.config import plural

        return (f"{plural(buckets, 'video bucket')} (WxHxframes), batch per bucket x "
                f"{plural(spec.ray.num_workers, 'worker')}")

    def check_spec(self, spec) -> None:
        from training.buckets import video_bucket_table

        if spec.data.cache:
            raise ConfigError("data.cache: the latent cache holds image latents; set it false for video models "
                              "(model.kind svd, svd_t2v)")
        if spec.data.captions and not self.text_encoders:
            raise ConfigError(f"data.captions: model.kind {self.name} is conditioned on a frame, not on text, so a "
                              f"caption mix would do nothing; remove it (svd_t2v trains on captions)")
        if not spec.video.min_fps <= spec.video.fps <= spec.video.max_fps:
            raise ConfigError(f"video.fps {spec.video.fps:g} must lie in [min_fps {spec.video.min_fps:g}, max_fps "
                              f"{spec.video.max_fps:g}]")
        try:
            table = video_bucket_table(spec.video.buckets)
        except (ValueError, AttributeError) as exc:
            raise ConfigError(f"video.buckets: {exc}") from None
        if not table or any(b.width % 8 or b.height % 8 for b in table):
            raise ConfigError("video.buckets: give at least one HEIGHTxWIDTH whose sides are multiples of 8")

    def spec_sections(self) -> tuple[str, ...]:
        return ("video",)

    def lora_layers(self, lora) -> str:
        """auto: the temporal layers only (the spatial ones keep the image model's look)."""
        return "temporal" if lora.layers == "auto" else lora.layers

    # ---- the worker ----
    def loader(self, spec, config: dict, index, cursor, rank: int, world: int, device):
        """(this rank's ClipLoader over the video buckets, the bucket list, no cache embeddings)."""
        from pipeline.contract import storage
        from pipeline.contract.layout import TrainRun
        from training.conditioning import MotionBucketMap
        from training.index import clip_bucket_ids
        from training.loader import ClipLoader

        buckets, bucket_of = clip_bucket_ids(index, spec.video)
        motion = MotionBucketMap.from_dict(json.loads(storage.read_bytes(TrainRun(config["output"]).motion)))
        ids = motion(index.column("motion_score").to_numpy(zero_copy_only=False))   # a null score is NaN: bucket 128
        v = spec.video
        loader = ClipLoader(index, buckets, bucket_of, cursor, rank, world, spec.train.seed, spec.data.random_crop,
                            spec.data.workers, spec.data.prefetch, v.fps, v.min_fps, v.max_fps, ids,
                            shard_copy_bytes=int(spec.data.shard_copy_gb * 2 ** 30),
                            mix=captions.for_loader(spec, index) if self.text_encoders else None)
        return loader, buckets, (None, None)

    def validation_loader(self, spec, config: dict, index):
        from training.schedule import Cursor

        loader, buckets, _ = self.loader(spec, config, index, Cursor(), 0, 1, None)
        return loader, [b.batch for b in buckets]

    def step_loss(self, ctx: base.StepContext, batch, g: torch.Generator, keep: base.Keep, unet) -> torch.Tensor:
        with ctx.autocast():
            return self._batch_loss(ctx.comps, batch.frames.to(ctx.device, ctx.vae_dtype), batch, ctx.spec, g, keep,
                                    unet)

    def validation_loss(self, ctx: base.StepContext, batch, g: torch.Generator, unet) -> torch.Tensor:
        """(B,) held-out loss: the training loss with nothing dropped."""
        n = len(batch.ids)
        return self.step_loss(ctx, batch, g, lambda name, p: torch.ones(n, dtype=torch.bool), unet)

    def training_samples(self, ctx: base.StepContext, unet, loader, buckets) -> list[list]:
        """Rank 0: videos from the family's sampler (image-to-video: the first training clip's first
        frame; text-to-video: the sample prompts, else that clip's caption) at the run's fps."""
        import numpy as np
        from PIL import Image

        from training.video_frames import decode_frames

        spec = ctx.spec
        first = int(np.flatnonzero(loader.bucket_of >= 0)[0])
        bucket = buckets[int(loader.bucket_of[first])]

        def first_frame():
            return Image.fromarray(decode_frames(loader.reader.read(first), [0.0])[0][0]).resize(
                (bucket.width, bucket.height))

        prompts = list(spec.train.sample_prompts) or [loader.captions[first]]
        with ctx.autocast():
            return self.sample_videos(ctx.comps, unet, bucket, spec.train.sample_steps, spec.video.fps,
                                      spec.train.seed, ctx.device, prompts, first_frame)

    # ---- generating from a finished run ----
    def check_generate(self, frames: bool) -> None:
        if not frames:
            raise ConfigError(f"--frames: an image-to-video run (model.kind {self.name}) samples from conditioning "
                              f"images; give a folder of them (paired in sorted order with the prompts)")

    def sample(self, c: Components, spec, prompts: list[str], frames: list | None, steps: int, guidance: float,
               size: int | None, num_frames: int | None, seed: int, device: str = "cpu",
               progress=None) -> list[list]:
        """One video (a list of PIL frames) per prompt, at the run's first video bucket's size and
        ``num_frames`` (default: that bucket's frame count), video k seeded ``seed + k``;
        image-to-video: from conditioning frame k (prompts beyond the frames are not sampled)."""
        from training.buckets import VideoBucket

        first = next(iter(spec.video.buckets))
        height, width = (int(x) for x in first.split("x"))
        bucket = VideoBucket(width, height, num_frames or int(next(iter(spec.video.buckets[first]))), 1)
        if frames:
            prompts = prompts[:len(frames)]
        c.unet.to(device)
        out = []
        for k, prompt in enumerate(prompts):
            cond = (lambda k=k: frames[k].convert("RGB").resize((width, height))) if frames else None
            out += self.sample_videos(c, c.unet, bucket, steps, spec.video.fps, seed + k, device, [prompt], cond)
            if progress:
                progress()
        return out


class SVDText(SVD):
    """Text-to-video, the SVD paper's video pretraining and fine-tuning stages (sec. 3.2-3.3): the
    same spatio-temporal UNet with in_channels 4 (no concatenated frame), the CLIP text encoder's
    last hidden state as cross-attention context (as the image model it was inflated from), the
    same EDM objective and ``[fps - 1, motion_bucket_id, 0]`` time ids. No diffusers pipeline runs
    this model: the export is a folder of its parts (``model_index.json`` names them) that winnow
    samples with its own Euler loop (``sample_videos``) and that an image-to-video stage starts from."""
    name = "svd_t2v"
    in_channels = 4
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
        c.encoders, c.processors = [encoder], [tokenizer]
        return ["text_encoder", "tokenizer"]

    def encode_text(self, c: Components, captions: list[str], device):
        return base.text_context(c, captions, device), None

    def encode_image(self, c: Components, frames: torch.Tensor) -> torch.Tensor:
        raise TypeError("svd_t2v is text-conditioned: use encode_text on the captions")

    def _batch_loss(self, c: Components, frames: torch.Tensor, batch, spec, g: torch.Generator, keep,
                    unet) -> torch.Tensor:
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

    def check_generate(self, frames: bool) -> None:
        base.Family.check_generate(self, frames)        # text-to-video: prompts alone

    def export(self, c: Components, unet, folder: str) -> str:
        """A folder of the parts (``model_index.json`` lists them)."""
        import diffusers

        os.makedirs(folder, exist_ok=True)
        parts = {"unet": unet, "vae": c.vae, "text_encoder": c.encoders[0], "tokenizer": c.processors[0],
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
