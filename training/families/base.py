"""The model-family protocol, and what every family shares: the components a run trains
(diffusers UNet + VAE + transformers CLIP text encoders), the offline CLIP tokenizer, the tiny
presets' shared parts, loading a diffusers folder and exporting one.

A family (``sd.py``, ``sdxl.py``) says what differs: which folders a pretrained pipeline has,
how captions become the UNet's conditioning, what extra the UNet call takes, which diffusers
pipeline it exports, and the widths the latent cache stores. Nothing outside ``families/``
branches on the family.

Two sources of weights:

* ``pretrained: PATH_OR_HUB_ID`` -- a diffusers-format pipeline folder (``model_index.json``,
  ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``, plus what the family
  adds). A hub id is fetched only with ``allow_download: true``.
* ``pretrained: null`` -- a tiny preset built in code from a seed (random weights; tests and the
  demo). Its CLIP tokenizer is built offline from the BPE vocabulary that open_clip ships, so the
  token ids are CLIP's own.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from pipeline.contract.config import ConfigError
from pipeline.models.tokenizer import clip_tokenizer_files, offline_clip_tokenizer
from training import captions

TINY_TEXT_WIDTH = 32


@dataclass
class Components:
    kind: str                                   # the family's name
    unet: torch.nn.Module
    vae: torch.nn.Module
    encoders: list = field(default_factory=list)     # the frozen conditioning encoders: CLIP text encoders (SD,
    #                                                  SDXL, svd_t2v), or SVD's CLIP vision encoder
    processors: list = field(default_factory=list)   # what feeds each encoder: a tokenizer, or SVD's image processor
    noise_scheduler: object = None              # DDPMScheduler: the training noise schedule
    sample_scheduler: object = None             # what the exported pipeline samples with

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type


@dataclass
class StepContext:
    """What a family's losses and samplers use of a worker: built once per worker
    (``training/worker/build.py``); the UNet is passed per call (the prepared one for a training
    step, the module itself for validation and sampling)."""

    spec: Any                                   # the run's TrainSpec
    comps: Components
    device: Any
    weight_dtype: torch.dtype = torch.float32   # the frozen encoders' dtype (the mixed-precision dtype)
    vae_dtype: torch.dtype = torch.float32      # fp32 where fp16 would overflow the VAE
    autocast: Callable[[], Any] = contextlib.nullcontext
    empty: tuple = (None, None)                 # the latent cache's empty-caption (context, pooled)


# a seeded keep-mask of one classifier-free-guidance drop: keep(name, p) -> (B,) bool tensor, drawn
# from its own (seed, name, step, rank) stream so a resumed run drops what the uninterrupted one did
Keep = Callable[[str, float], torch.Tensor]


# ---- offline CLIP tokenizer: pipeline.models.tokenizer (the captioners' tiny presets use it too) ----

def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


@torch.no_grad()
def text_context(c: Components, captions: list[str], device) -> torch.Tensor:
    """The first text encoder's last hidden state for ``captions``: SD 1.x / 2.x's cross-attention
    context (and the text-to-video UNet's, inflated from it)."""
    return c.encoders[0](tokenize(c.processors[0], captions).to(device))[0]


# ---- tiny presets: the shared parts ----

def tiny_text_encoder(with_projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=TINY_TEXT_WIDTH, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, projection_dim=TINY_TEXT_WIDTH,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def tiny_vae(seed: int, scaling_factor: float):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    # 32-group norms and 2 layers per block, as SD's VAE has, so the preset inflates into SVD's
    # temporal decoder; a zero post_quant_conv bias makes that decoder exact (training/inflate.py)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 32, 32),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, norm_num_groups=32, sample_size=128, scaling_factor=scaling_factor)
    with torch.no_grad():
        vae.post_quant_conv.bias.zero_()
    return vae


TINY_UNET = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=8, norm_num_groups=32)


def tiny_schedulers(prediction_type: str):
    """(DDPM for training, DDIM for sampling) with SD's scaled-linear betas."""
    from diffusers import DDIMScheduler, DDPMScheduler

    kw = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
              prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    noise = DDPMScheduler(**{k: v for k, v in kw.items() if k not in ("set_alpha_to_one", "steps_offset")})
    return noise, DDIMScheduler(**kw)


class Family:
    """What a model family must say. Subclasses set ``name``, ``text_encoders`` (the pretrained
    folder's encoder subfolders, each with its tokenizer), ``tiny_scaling_factor`` and implement
    the methods below."""

    name: ClassVar[str] = ""
    clips: ClassVar[bool] = False          # trains on curated clips (ClipLoader, video buckets), not images
    inflates: ClassVar[bool] = False       # its UNet inflates into a video UNet (training/inflate.py)
    follows: ClassVar[tuple[str, ...]] = ()   # other video families whose UNet this one starts from (conv_in widened)
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)
    tiny_scaling_factor: ClassVar[float] = 0.18215

    @property
    def subfolders(self) -> list[str]:
        tokenizers = [e.replace("text_encoder", "tokenizer") for e in self.text_encoders]
        return [
            "unet",
            "vae",
            *[x for pair in zip(self.text_encoders, tokenizers, strict=True) for x in pair],
            "scheduler",
        ]

    # ---- components ----
    def tiny(self, seed: int, scratch: str, prediction_type: str = "epsilon") -> Components:  # pragma: no cover
        raise NotImplementedError

    def _encoder_classes(self) -> list:  # pragma: no cover - interface
        raise NotImplementedError

    def load(self, pretrained: str, allow_download: bool = False, prediction_type: str | None = None) -> Components:
        from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTokenizer

        kw = dict(local_files_only=not allow_download)
        noise = DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler", **kw)
        # the sampler keeps the folder's own DDIM settings (steps_offset, set_alpha_to_one), which a
        # DDPM config drops
        sample = DDIMScheduler.from_pretrained(pretrained, subfolder="scheduler", **kw)
        if prediction_type and prediction_type != noise.config.prediction_type:
            noise = DDPMScheduler.from_config(noise.config, prediction_type=prediction_type)
            sample = DDIMScheduler.from_config(sample.config, prediction_type=prediction_type)
        encoders = [cls.from_pretrained(pretrained, subfolder=sub, **kw)
                    for cls, sub in zip(self._encoder_classes(), self.text_encoders, strict=True)]
        tokenizers = [
            CLIPTokenizer.from_pretrained(pretrained, subfolder=sub.replace("text_encoder", "tokenizer"), **kw)
            for sub in self.text_encoders
        ]
        return Components(self.name, UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", **kw),
                          AutoencoderKL.from_pretrained(pretrained, subfolder="vae", **kw),
                          encoders, tokenizers, noise, sample)

    def components(self, pretrained: str | None, allow_download: bool, seed: int, scratch: str,
                   prediction_type: str | None) -> Components:
        """The spec's model: loaded from ``pretrained``, else the tiny preset of ``seed``."""
        if pretrained:
            from pipeline.contract import storage

            with storage.local_copy(pretrained) as folder:    # a pipeline on a store: this node's copy, read whole
                return self.load(folder, allow_download, prediction_type)
        return self.tiny(seed, scratch, prediction_type or "epsilon")

    def run_components(self, spec) -> Components:
        """A run's models (``spec.model``). A tiny preset's tokenizer passes through a temporary
        folder that is gone before training starts, so a worker killed mid-run leaves none behind."""
        import tempfile

        m = spec.model
        with tempfile.TemporaryDirectory(prefix="winnow-train-") as scratch:
            return self.components(m.pretrained, m.allow_download, m.seed, scratch, spec.objective.prediction_type)

    def inherit(self, c: Components, image_pipeline: str) -> list[str]:
        """Replace parts of ``c`` by the image pipeline's this video model was inflated from (the
        subfolders taken); most families keep their own."""
        return []

    def check_pretrained(self, path: str, key: str = "model.pretrained") -> None:
        """Fail before Ray starts when a local pipeline folder lacks what the family needs."""
        from pipeline.contract import storage
        from pipeline.contract.config import ConfigError

        if not storage.is_url(path) and not os.path.isdir(path):
            return                                         # a hub id; resolved by from_pretrained
        names = storage.listdir(path)
        if "model_index.json" not in names:
            raise ConfigError(f"{key}: {path!r} has no model_index.json; point it at a diffusers pipeline folder "
                              f"(one with {', '.join(self.subfolders)})")
        missing = [s for s in self.subfolders if s not in names or storage.isfile(storage.join(path, s))]
        if missing:
            raise ConfigError(f"{key}: {path!r} lacks {', '.join(missing)}/ needed by model.kind={self.name!r}"
                              + self.missing_hint(missing))

    def missing_hint(self, missing: list[str]) -> str:
        return ""

    # ---- the run: what the driver and the spec ask (this class: images, one bucket per batch) ----
    def load_index(self, shards: list[str], work: str, log, selection: str | None, map_tables):
        """The index of every kept sample the run trains on (``training.index``)."""
        from training.index import load_index

        return load_index(shards, work, log, selection, map_tables, self.clips)

    def plan_buckets(self, spec, index) -> tuple[list, np.ndarray, list[int], list[str]]:
        """(buckets, each sample's bucket or -1, global batch per bucket, bucket names)."""
        from training.index import bucket_ids

        buckets, bucket_of = bucket_ids(index, spec.data.resolution, spec.data.bucket_step, spec.data.max_aspect)
        sizes = [spec.train.batch_size * spec.ray.num_workers] * len(buckets)
        return buckets, bucket_of, sizes, [f"{b.width}x{b.height}" for b in buckets]

    def prepare_run(self, spec, index, bucket_of) -> list[str]:
        """Write what the run's workers read beside the index (the driver, once); notes for the plan."""
        return []

    def describe_plan(self, spec, buckets: int, global_batch: int) -> str:
        from pipeline.contract.config import plural

        return (f"{plural(buckets, 'bucket')} at base {spec.data.resolution}, global batch {global_batch} "
                f"({spec.train.batch_size} x {plural(spec.ray.num_workers, 'worker')})")

    def check_spec(self, spec) -> None:
        """Raise a ConfigError for settings this family cannot honour (before Ray starts)."""
        if spec.lora.enabled and spec.lora.layers in ("temporal", "spatial"):
            raise ConfigError(f"lora.layers: {spec.lora.layers!r} applies to video UNets (model.kind svd, svd_t2v); "
                              f"use auto or all for model.kind {self.name}")

    def spec_sections(self) -> tuple[str, ...]:
        """The spec sections beyond the common ones that change what this family trains (fingerprinted)."""
        return ()

    def lora_layers(self, lora) -> str:
        """``lora.layers`` resolved: auto is every layer of an image UNet."""
        return "all" if lora.layers == "auto" else lora.layers

    # ---- the worker: loader, losses, samples (every rank but where said) ----
    def loader(self, spec, config: dict, index, cursor, rank: int, world: int, device):
        """(this rank's loader over the run's buckets, the bucket list, the cache's empty-caption
        embeddings on ``device`` or (None, None))."""
        from training.index import bucket_ids
        from training.loader import BucketLoader

        buckets, bucket_of = bucket_ids(index, spec.data.resolution, spec.data.bucket_step, spec.data.max_aspect)
        cache, empty = None, (None, None)
        if config.get("cache_dir"):
            from training.cache import LatentCache

            cache = LatentCache(config["cache_dir"], buckets, bucket_of)
            empty = (torch.from_numpy(cache.empty).float().to(device),
                     None if cache.empty_pooled is None else torch.from_numpy(cache.empty_pooled).float().to(device))
        loader = BucketLoader(index, buckets, bucket_of, cursor, spec.train.batch_size, rank, world, spec.train.seed,
                              spec.data.random_crop, spec.data.workers, spec.data.prefetch, cache=cache,
                              shard_copy_bytes=int(spec.data.shard_copy_gb * 2 ** 30),
                              mix=captions.for_loader(spec, index))
        return loader, buckets, empty

    def validation_loader(self, spec, config: dict, index):
        """(a loader over the held-out rows, centre crops; the batch size of each of its buckets)."""
        from training.index import bucket_ids
        from training.loader import BucketLoader
        from training.schedule import Cursor

        buckets, bucket_of = bucket_ids(index, spec.data.resolution, spec.data.bucket_step, spec.data.max_aspect)
        loader = BucketLoader(index, buckets, bucket_of, Cursor(), spec.train.batch_size, 0, 1, spec.train.seed,
                              False, 1, 1, mix=captions.for_loader(spec, index))
        return loader, [spec.train.batch_size] * len(buckets)

    def latents(self, ctx: StepContext, batch, keep: torch.Tensor, g: torch.Generator):
        """(scaled latents, text context, pooled embedding or None) of an image batch: encoded now,
        or read from the latent cache; a dropped caption becomes the empty caption."""
        device, comps = ctx.device, ctx.comps
        latent_dtype = ctx.weight_dtype if ctx.weight_dtype != torch.float16 else torch.float32
        with torch.no_grad():
            if batch.latents is None:
                dist = comps.vae.encode(batch.pixels.to(device, dtype=ctx.vae_dtype)).latent_dist
                mean, std = dist.mean, dist.std
                captions = [c if bool(k) else "" for c, k in zip(batch.captions, keep, strict=True)]
                context, pooled = self.encode_text(comps, captions, device)
            else:                                   # data.cache: latents and text precomputed
                mean, std = batch.latents[:, 0].to(device), batch.latents[:, 1].to(device)
                mask = keep.to(device)
                empty_context, empty_pooled = ctx.empty
                context = torch.where(mask[:, None, None], batch.context.to(device), empty_context)
                pooled = None if batch.pooled is None else torch.where(mask[:, None], batch.pooled.to(device),
                                                                       empty_pooled)
            latents = mean + std * torch.randn(mean.shape, generator=g).to(device, mean.dtype)
            latents = (latents * comps.vae.config.scaling_factor).to(latent_dtype)
            context = context.to(ctx.weight_dtype)
            pooled = None if pooled is None else pooled.to(ctx.weight_dtype)
        return latents, context, pooled

    def denoising_loss(self, ctx: StepContext, unet, latents, noise, t, context, added) -> torch.Tensor:
        """Per-sample mean squared error of the UNet's prediction of ``latents`` noised with ``noise``
        at timesteps ``t`` against its target (epsilon, or v): the one image loss, which training
        and validation both call."""
        import torch.nn.functional as F

        from training import objectives as obj

        ac = ctx.comps.noise_scheduler.alphas_cumprod.to(ctx.device)
        noisy = obj.add_noise(latents, noise, t, ac)
        target = obj.target(ctx.comps.prediction_type, latents, noise, t, ac)
        with ctx.autocast():
            pred = unet(noisy, t, context, added_cond_kwargs=added).sample
        return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))

    def step_loss(self, ctx: StepContext, batch, g: torch.Generator, keep: Keep, unet) -> torch.Tensor:
        """The training step's per-sample loss: noise, offset noise and timesteps from ``g``
        (``denoising_loss``), min-SNR weighting when set."""
        from training import objectives as obj

        spec, device, sched = ctx.spec, ctx.device, ctx.comps.noise_scheduler
        ac = sched.alphas_cumprod.to(device)
        latents, context, pooled = self.latents(ctx, batch, keep("captions", spec.objective.caption_dropout), g)
        noise = obj.offset_noise(torch.randn(latents.shape, generator=g), spec.objective.offset_noise, g).to(
            device, latents.dtype)
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=g).to(device)
        per_sample = self.denoising_loss(ctx, unet, latents, noise, t, context,
                                         self.unet_conditions(pooled, batch.time_ids, device))
        if spec.objective.min_snr_gamma:
            gamma = spec.objective.min_snr_gamma
            per_sample = per_sample * obj.min_snr_weights(t, ac, gamma, ctx.comps.prediction_type)
        return per_sample

    def validation_loss(self, ctx: StepContext, batch, g: torch.Generator, unet) -> torch.Tensor:
        """(B, timesteps) held-out loss (``denoising_loss``) at fixed timesteps
        (``training.validate.fixed_timesteps``), captions kept, the same noise for every timestep."""
        from training.validate import fixed_timesteps

        device, comps = ctx.device, ctx.comps
        keep = torch.ones(len(batch.ids), dtype=torch.bool)
        latents, context, pooled = self.latents(ctx, batch, keep, g)
        noise = torch.randn(latents.shape, generator=g).to(device, latents.dtype)
        added = self.unet_conditions(pooled, batch.time_ids, device)
        out = []
        for t in fixed_timesteps(comps.noise_scheduler.config.num_train_timesteps):
            tt = torch.full((latents.shape[0],), t, device=device, dtype=torch.long)
            out.append(self.denoising_loss(ctx, unet, latents, noise, tt, context, added))
        return torch.stack(out, dim=1)

    def training_samples(self, ctx: StepContext, unet, loader, buckets) -> list[list]:
        """Rank 0: the run's samples as lists of PIL frames (an image is one frame): the sample
        prompts through the family's pipeline at the base resolution, prompt k seeded seed + k."""
        spec = ctx.spec
        if not spec.train.sample_prompts:
            return []
        pipe = self.build_pipeline(ctx.comps, unet).to(ctx.device)
        pipe.set_progress_bar_config(disable=True)
        out = []
        for k, prompt in enumerate(spec.train.sample_prompts):
            g = torch.Generator("cpu").manual_seed(spec.train.seed + k)
            with ctx.autocast():
                out.append([pipe(prompt, num_inference_steps=spec.train.sample_steps, height=spec.data.resolution,
                                 width=spec.data.resolution, generator=g).images[0]])
        return out

    # ---- generating from a finished run (winnow eval) ----
    def interpolates(self) -> bool:
        """Whether the family fills in frames between given ones (``interpolate``), scored on held-out
        clips rather than sampled from prompts."""
        return False

    def check_generate(self, frames: bool) -> None:
        """Raise a ConfigError when ``--frames`` is given (or missing) against what the family samples from."""
        if frames:
            raise ConfigError(f"--frames: model.kind {self.name} samples from prompts alone; drop --frames")

    def sample(self, c: Components, spec, prompts: list[str], frames: list | None, steps: int, guidance: float,
               size: int | None, num_frames: int | None, seed: int, device: str = "cpu",
               progress=None) -> list[list]:
        """One list of PIL frames per prompt (an image: one frame), prompt k seeded ``seed + k``, at
        ``size`` (default: the run's resolution, at most 512)."""
        size = size or min(spec.data.resolution, 512)
        pipe = self.build_pipeline(c).to(device)
        pipe.set_progress_bar_config(disable=True)
        out = []
        for k, prompt in enumerate(prompts):
            g = torch.Generator("cpu").manual_seed(seed + k)
            out.append([pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                             generator=g).images[0]])
            if progress:
                progress()
        return out

    # ---- conditioning and the UNet call ----
    def encode_text(self, c: Components, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(context for cross-attention, pooled text embedding or None), as the family's pipeline computes them."""
        raise NotImplementedError  # pragma: no cover

    def unet_conditions(self, pooled: torch.Tensor | None, time_ids: torch.Tensor, device) -> dict | None:
        """The UNet call's ``added_cond_kwargs`` (None: the family has none)."""
        return None

    # ---- export ----
    def build_pipeline(self, c: Components, unet=None):  # pragma: no cover - interface
        raise NotImplementedError

    def export(self, c: Components, unet, folder: str) -> str:
        """A complete diffusers pipeline folder (safetensors) with ``unet`` as its UNet."""
        self.build_pipeline(c, unet).save_pretrained(folder, safe_serialization=True)
        return folder

    # ---- the latent cache ----
    def cache_dims(self, pretrained: str | None, allow_download: bool = False) -> dict:
        """Latent channels, context width, pooled width (0: none) and tokens, from configs only."""
        if not pretrained:
            n = len(self.text_encoders)
            return {"latent_channels": 4, "context": TINY_TEXT_WIDTH * n, "pooled": self._pooled(TINY_TEXT_WIDTH),
                    "tokens": 77}
        from diffusers import AutoencoderKL
        from transformers import CLIPTextConfig

        kw = dict(local_files_only=not allow_download)
        vae = AutoencoderKL.load_config(pretrained, subfolder="vae", **kw)
        te = [CLIPTextConfig.from_pretrained(pretrained, subfolder=s, **kw) for s in self.text_encoders]
        return {"latent_channels": vae["latent_channels"], "context": sum(c.hidden_size for c in te),
                "pooled": self._pooled(te[-1].projection_dim), "tokens": te[0].max_position_embeddings}

    def _pooled(self, projection_dim: int) -> int:
        return 0


__all__ = ["Components", "Family", "Keep", "StepContext", "TINY_TEXT_WIDTH", "clip_tokenizer_files",
           "offline_clip_tokenizer", "text_context", "tokenize"]
