"""The models a run trains: diffusers UNet + VAE + transformers CLIP text encoders.

Two sources:

* ``pretrained: PATH_OR_HUB_ID`` -- a diffusers-format pipeline folder (``model_index.json``,
  ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``, plus ``text_encoder_2/``
  and ``tokenizer_2/`` for SDXL). A hub id is fetched only with ``allow_download: true``.
* ``pretrained: null`` -- a tiny preset built in code from a seed (random weights; tests and the
  demo). Its CLIP tokenizer is built offline from the BPE vocabulary that open_clip ships, so the
  token ids are CLIP's own.

``export_pipeline`` writes a complete diffusers pipeline folder that
``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline.from_pretrained`` load as it is.
"""
from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass, field

import torch

SUBFOLDERS = {"sd": ["unet", "vae", "text_encoder", "tokenizer", "scheduler"],
              "sdxl": ["unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"]}
TINY_TEXT_WIDTH = 32


@dataclass
class Components:
    kind: str                                   # "sd" or "sdxl"
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list = field(default_factory=list)
    tokenizers: list = field(default_factory=list)
    noise_scheduler: object = None              # DDPMScheduler: the training noise schedule
    sample_scheduler: object = None             # what the exported pipeline samples with

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

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


# ---- tiny presets ----

def _tiny_text_encoder(with_projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=TINY_TEXT_WIDTH, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, projection_dim=TINY_TEXT_WIDTH,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def tiny_components(kind: str, seed: int, scratch: str, prediction_type: str = "epsilon") -> Components:
    """Random-weight SD / SDXL-shaped models small enough to train on a laptop CPU.

    Geometry is real (VAE factor 8, 4 latent channels, CLIP's tokenizer and 77 tokens, SDXL's
    two encoders, concatenated context and ``text_time`` micro-conditioning); widths are tiny.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32, 32),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=16, sample_size=128,
                        scaling_factor=0.13025 if kind == "sdxl" else 0.18215)
    unet_kw = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                   block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=8, norm_num_groups=32)
    if kind == "sdxl":
        unet_kw.update(cross_attention_dim=2 * TINY_TEXT_WIDTH, addition_embed_type="text_time",
                       addition_time_embed_dim=8, projection_class_embeddings_input_dim=TINY_TEXT_WIDTH + 6 * 8,
                       use_linear_projection=True)
    else:
        unet_kw.update(cross_attention_dim=TINY_TEXT_WIDTH)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**unet_kw)
    encoders = [_tiny_text_encoder(False, seed + 2)]
    tokenizers = [offline_clip_tokenizer(os.path.join(scratch, "tokenizer"))]
    if kind == "sdxl":
        encoders.append(_tiny_text_encoder(True, seed + 3))
        tokenizers.append(offline_clip_tokenizer(os.path.join(scratch, "tokenizer_2"), pad_token="!"))
    sched_kw = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    noise = DDPMScheduler(**{k: v for k, v in sched_kw.items() if k not in ("set_alpha_to_one", "steps_offset")})
    return Components(kind, unet, vae, encoders, tokenizers, noise, DDIMScheduler(**sched_kw))


# ---- real weights ----

def check_pretrained(path: str, kind: str, key: str = "model.pretrained") -> None:
    """Fail before Ray starts when a local pipeline folder lacks what ``kind`` needs."""
    from pipeline.contract.config import ConfigError

    if not os.path.isdir(path):
        return                                         # a hub id; resolved by from_pretrained
    if not os.path.exists(os.path.join(path, "model_index.json")):
        raise ConfigError(f"{key}: {path!r} has no model_index.json; point it at a diffusers pipeline folder "
                          f"(one with {', '.join(SUBFOLDERS[kind])})")
    missing = [s for s in SUBFOLDERS[kind] if not os.path.isdir(os.path.join(path, s))]
    if missing:
        raise ConfigError(f"{key}: {path!r} lacks {', '.join(missing)}/ needed by model.kind={kind!r}"
                          + (" (an SD 1.x/2.x folder? set model.kind: sd)" if "text_encoder_2" in missing else ""))


def load_components(kind: str, pretrained: str, allow_download: bool = False,
                    prediction_type: str | None = None) -> Components:
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    kw = dict(local_files_only=not allow_download)
    noise = DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler", **kw)
    if prediction_type and prediction_type != noise.config.prediction_type:
        noise = DDPMScheduler.from_config(noise.config, prediction_type=prediction_type)
    sample = DDIMScheduler.from_config(noise.config)
    encoders = [CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", **kw)]
    tokenizers = [CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer", **kw)]
    if kind == "sdxl":
        encoders.append(CLIPTextModelWithProjection.from_pretrained(pretrained, subfolder="text_encoder_2", **kw))
        tokenizers.append(CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer_2", **kw))
    return Components(kind, UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", **kw),
                      AutoencoderKL.from_pretrained(pretrained, subfolder="vae", **kw),
                      encoders, tokenizers, noise, sample)


# ---- text conditioning ----

def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


@torch.no_grad()
def encode_text(c: Components, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(context for cross-attention, pooled text embedding or None), as the pipelines compute them:
    SD uses the encoder's last hidden state; SDXL concatenates both encoders' penultimate hidden
    states and takes the second encoder's projected pooled output."""
    if c.kind == "sd":
        return c.text_encoders[0](tokenize(c.tokenizers[0], captions).to(device))[0], None
    hidden, pooled = [], None
    for enc, tok in zip(c.text_encoders, c.tokenizers):
        out = enc(tokenize(tok, captions).to(device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]
    return torch.cat(hidden, dim=-1), pooled


# ---- export ----

def build_pipeline(c: Components, unet=None):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    unet = unet if unet is not None else c.unet
    if c.kind == "sdxl":
        return StableDiffusionXLPipeline(vae=c.vae, text_encoder=c.text_encoders[0], text_encoder_2=c.text_encoders[1],
                                         tokenizer=c.tokenizers[0], tokenizer_2=c.tokenizers[1], unet=unet,
                                         scheduler=c.sample_scheduler)
    return StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoders[0], tokenizer=c.tokenizers[0], unet=unet,
                                   scheduler=c.sample_scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def export_pipeline(c: Components, unet, folder: str) -> str:
    """A complete diffusers pipeline folder (safetensors) with ``unet`` as its UNet."""
    build_pipeline(c, unet).save_pretrained(folder, safe_serialization=True)
    return folder


__all__ = ["Components", "build_pipeline", "check_pretrained", "clip_tokenizer_files", "encode_text",
           "export_pipeline", "load_components", "offline_clip_tokenizer", "tiny_components", "tokenize"]
