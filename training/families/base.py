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

import gzip
import json
import os
from dataclasses import dataclass, field
from typing import ClassVar

import torch

TINY_TEXT_WIDTH = 32


@dataclass
class Components:
    kind: str                                   # the family's name
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list = field(default_factory=list)
    tokenizers: list = field(default_factory=list)
    noise_scheduler: object = None              # DDPMScheduler: the training noise schedule
    sample_scheduler: object = None             # what the exported pipeline samples with

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type


# ---- offline CLIP tokenizer ----

def clip_tokenizer_files(folder: str) -> str:
    """Write CLIP's vocab.json / merges.txt (from open_clip's bundled BPE file) into ``folder``.

    The vocabulary is CLIP's construction (Radford et al., 2021): the 256 byte symbols, the same
    with the end-of-word marker, one token per merge, then the two special tokens -- 49,408 ids.
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe()) as fh:
        merges = fh.read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as fh:
        json.dump({tok: i for i, tok in enumerate(vocab)}, fh, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as fh:
        fh.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def offline_clip_tokenizer(folder: str, pad_token: str = "<|endoftext|>"):
    """A transformers ``CLIPTokenizer`` with CLIP's ids, built without a download."""
    from transformers import CLIPTokenizer

    clip_tokenizer_files(folder)
    # transformers 5 builds a 2-token vocabulary from CLIPTokenizer(vocab_file=...): go through
    # from_pretrained on the folder instead, then save it complete.
    tok = CLIPTokenizer.from_pretrained(folder, pad_token=pad_token, model_max_length=77)
    tok.save_pretrained(folder)
    return tok


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


@torch.no_grad()
def text_context(c: Components, captions: list[str], device) -> torch.Tensor:
    """The first text encoder's last hidden state for ``captions``: SD 1.x / 2.x's cross-attention
    context (and the text-to-video UNet's, inflated from it)."""
    return c.text_encoders[0](tokenize(c.tokenizers[0], captions).to(device))[0]


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
    image_conditioned: ClassVar[bool] = False   # samples from a conditioning frame (image-to-video)
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


__all__ = ["Components", "Family", "TINY_TEXT_WIDTH", "clip_tokenizer_files", "offline_clip_tokenizer", "text_context",
           "tokenize"]
