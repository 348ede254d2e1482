"""Inflation: an image UNet (diffusers ``UNet2DConditionModel``, SD 1.x or 2.x layout) becomes a
video UNet (``UNetSpatioTemporalConditionModel``, SVD's) that, at initialisation, computes what
the image UNet computes on every frame (Blattmann et al., 2023, sec. 3: the video model starts
from the image model, temporal layers added).

Every spatial weight is copied (a resnet ``resnets.N.*`` becomes ``resnets.N.spatial_res_block.*``;
SD 1.x's 1x1-conv ``proj_in`` / ``proj_out`` become linear layers); ``conv_in`` is widened with zero
input channels (8 for image-to-video: the conditioning frame's latent is concatenated); the new
temporal layers keep diffusers' initialisation except their output projections, which are zero,
as is the last layer of ``add_embedding`` (the fps / motion / noise-augmentation ids). A temporal
resnet then returns its input, a temporal transformer its input, so each time mixer blends two
equal tensors and the model is the image model frame by frame. The one difference that remains
is architectural: SVD's mid and up resnets normalise with GroupNorm eps 1e-6 where SD's use 1e-5.

The VAE likewise becomes an ``AutoencoderKLTemporalDecoder`` (SVD's): the encoder is copied, the
decoder's resnets become its spatial halves with zero-output temporal halves, the final temporal
convolution starts as the identity in time, and the 2-D VAE's ``post_quant_conv`` (which the
temporal decoder lacks) is folded into the decoder's ``conv_in``. The fold is exact except where
``conv_in``'s window overlaps the zero padding: there the 2-D VAE pads ``post_quant_conv(z)`` with
zeros and the fold in effect pads it with ``post_quant_conv``'s bias. With that bias zero every
frame decodes as the 2-D VAE decodes it (to float rounding); otherwise the border difference is
proportional to the bias, and the mid block's attention spreads it over the frame
(``inflation.json`` records the bias norm, so a user can judge it).

``inflation.json`` lists the keys mapped, new and unused; a layout winnow does not know raises
instead of dropping weights (unused stays empty).
"""
from __future__ import annotations

import json
import os

import torch

BLOCKS = {"CrossAttnDownBlock2D": "CrossAttnDownBlockSpatioTemporal", "DownBlock2D": "DownBlockSpatioTemporal",
          "CrossAttnUpBlock2D": "CrossAttnUpBlockSpatioTemporal", "UpBlock2D": "UpBlockSpatioTemporal"}
NEW_PARTS = ("temporal_res_block.", "temporal_transformer_blocks.", "time_pos_embed.", "time_mixer.")
# output layers of the new parts: zero, so that each starts as the identity (or adds nothing)
ZERO_INIT = ("temporal_res_block.conv2.", "ff_in.net.2.", "attn1.to_out.0.", "attn2.to_out.0.", "ff.net.2.",
             "time_pos_embed.linear_2.", "add_embedding.linear_2.")
SVD_TIME_IDS = 3                  # fps - 1, motion_bucket_id, noise_aug_strength


class InflationError(ValueError):
    """The source is not an image UNet winnow can inflate; the message says what differs."""


def video_config(config: dict, in_channels: int = 8, num_frames: int = 14, addition_time_embed_dim: int = 256) -> dict:
    """The ``UNetSpatioTemporalConditionModel`` config that matches an image UNet's config."""
    def need(key, want, why):
        if config.get(key, want) != want:
            raise InflationError(f"{key}={config.get(key)!r}: SVD's UNet needs {want!r} ({why})")

    need("norm_num_groups", 32, "its group norms have 32 groups")
    need("flip_sin_to_cos", True, "its timestep embedding is cos-first")
    need("freq_shift", 0, "its timestep embedding has no frequency shift")
    for key in ("addition_embed_type", "class_embed_type", "encoder_hid_dim", "time_cond_proj_dim"):
        if config.get(key) is not None:
            raise InflationError(f"{key}={config[key]!r}: an SD 1.x/2.x UNet has none (SDXL's UNet does not inflate "
                                 f"to SVD's); inflate an SD 1.x or 2.x UNet")
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    unknown = [b for b in down + up if b not in BLOCKS]
    if unknown or config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise InflationError(f"block types {unknown or [config.get('mid_block_type')]} have no spatio-temporal "
                             f"counterpart; known: {', '.join(BLOCKS)} and UNetMidBlock2DCrossAttn")
    heads = config.get("num_attention_heads") or config["attention_head_dim"]  # diffusers' naming: heads
    return {
        "sample_size": config.get("sample_size"),
        "in_channels": in_channels,
        "out_channels": config["out_channels"],
        "down_block_types": [BLOCKS[b] for b in down],
        "up_block_types": [BLOCKS[b] for b in up],
        "block_out_channels": list(config["block_out_channels"]),
        "layers_per_block": config["layers_per_block"],
        "cross_attention_dim": config["cross_attention_dim"],
        "transformer_layers_per_block": config.get("transformer_layers_per_block", 1),
        "num_attention_heads": heads if isinstance(heads, int) else list(heads),
        "addition_time_embed_dim": addition_time_embed_dim,
        "projection_class_embeddings_input_dim": SVD_TIME_IDS * addition_time_embed_dim,
        "num_frames": num_frames,
    }


def _source_key(key: str) -> str | None:
    """The image UNet's key for a video UNet key, or None for a new (temporal) parameter."""
    if key.startswith("add_embedding.") or any(p in key for p in NEW_PARTS):
        return None
    return key.replace(".spatial_res_block.", ".")


def inflate_unet(unet2d, in_channels: int = 8, num_frames: int = 14, addition_time_embed_dim: int = 256):
    """(the video UNet, {"mapped", "new", "unused"} key lists)."""
    from diffusers import UNetSpatioTemporalConditionModel

    config = video_config(dict(unet2d.config), in_channels, num_frames, addition_time_embed_dim)
    if in_channels < unet2d.config.in_channels:
        raise InflationError(f"--in-channels {in_channels} is fewer than the image UNet's {unet2d.config.in_channels}")
    video = UNetSpatioTemporalConditionModel(**config)
    source = unet2d.state_dict()
    state = video.state_dict()
    mapped, new = [], []
    with torch.no_grad():
        for key, value in state.items():
            src = _source_key(key)
            if src is None:
                new.append(key)
                if any(z in key for z in ZERO_INIT):
                    value.zero_()
                continue
            if src not in source:
                raise InflationError(f"{key}: the image UNet has no {src!r}; its layout is not SD 1.x / 2.x")
            w = source[src]
            if key == "conv_in.weight":                   # extra input channels (the concatenated frame) start at zero
                value.zero_()
                value[:, :w.shape[1]] = w
            elif w.ndim == 4 and value.ndim == 2 and w.shape[2:] == (1, 1):
                value.copy_(w[:, :, 0, 0])                 # SD 1.x's 1x1-conv projections as linear layers
            elif w.shape != value.shape:
                raise InflationError(f"{key}: shape {tuple(w.shape)} in the image UNet, {tuple(value.shape)} here")
            else:
                value.copy_(w)
            mapped.append(key)
    video.load_state_dict(state)
    used = {_source_key(k) for k in mapped}
    unused = [k for k in source if k not in used]
    if unused:
        raise InflationError(f"{len(unused)} weights of the image UNet would be dropped (first: {unused[0]})")
    return video, {"mapped": mapped, "new": new, "unused": unused}


def inflate_vae(vae2d):
    """(an ``AutoencoderKLTemporalDecoder`` that decodes every frame as ``vae2d`` does, key report)."""
    from diffusers import AutoencoderKLTemporalDecoder

    cfg = dict(vae2d.config)
    if cfg.get("norm_num_groups", 32) != 32:
        raise InflationError(f"norm_num_groups={cfg['norm_num_groups']}: SVD's temporal decoder has 32 groups")
    if cfg["layers_per_block"] != 2:
        raise InflationError(f"layers_per_block={cfg['layers_per_block']}: the temporal decoder's mid block then has "
                             f"{cfg['layers_per_block']} resnets where the 2-D decoder has 2 (SD's VAE has 2)")
    if not cfg.get("use_post_quant_conv", True) or not cfg.get("use_quant_conv", True):
        raise InflationError("a VAE without quant_conv / post_quant_conv is not SD's layout")
    video = AutoencoderKLTemporalDecoder(**{k: cfg[k] for k in (
        "in_channels", "out_channels", "down_block_types", "block_out_channels", "layers_per_block", "latent_channels",
        "sample_size", "scaling_factor", "force_upcast")})
    source, state = vae2d.state_dict(), video.state_dict()
    mapped, new = [], []
    with torch.no_grad():
        for key, value in state.items():
            if "temporal_res_block." in key or "time_mixer." in key or key.startswith("decoder.time_conv_out."):
                new.append(key)
                if "temporal_res_block.conv2." in key or key == "decoder.time_conv_out.bias":
                    value.zero_()
                elif key == "decoder.time_conv_out.weight":     # (C, C, 3, 1, 1): pass the middle frame through
                    value.zero_()
                    value[:, :, 1, 0, 0] = torch.eye(value.shape[0])
                continue
            if key.startswith("decoder.conv_in."):            # conv_in(post_quant_conv(z)) as one convolution
                w_in, b_in = source["decoder.conv_in.weight"], source["decoder.conv_in.bias"]
                w_pq, b_pq = source["post_quant_conv.weight"][:, :, 0, 0], source["post_quant_conv.bias"]
                value.copy_(torch.einsum("ojhw,ji->oihw", w_in, w_pq) if key.endswith("weight")
                            else b_in + torch.einsum("ojhw,j->o", w_in, b_pq))
                mapped.append(key)
                continue
            src = key.replace(".spatial_res_block.", ".")
            if src not in source or source[src].shape != value.shape:
                raise InflationError(f"{key}: the 2-D VAE has no {src!r} of shape {tuple(value.shape)}")
            value.copy_(source[src])
            mapped.append(key)
    video.load_state_dict(state)
    used = {k.replace(".spatial_res_block.", ".") for k in mapped} | {"post_quant_conv.weight", "post_quant_conv.bias"}
    unused = [k for k in source if k not in used]
    if unused:
        raise InflationError(f"{len(unused)} weights of the 2-D VAE would be dropped (first: {unused[0]})")
    return video, {"mapped": mapped, "new": new, "unused": unused,
                   "post_quant_conv_bias_norm": float(source["post_quant_conv.bias"].norm())}


def load_image_unet(source: str):
    """A ``UNet2DConditionModel`` folder, or a pipeline folder's ``unet/``."""
    from diffusers import UNet2DConditionModel

    if os.path.isfile(os.path.join(source, "model_index.json")) and os.path.isdir(os.path.join(source, "unet")):
        source = os.path.join(source, "unet")
    if not os.path.isfile(os.path.join(source, "config.json")):
        raise InflationError(f"{source!r} is neither a UNet folder (config.json) nor a pipeline folder with unet/")
    return UNet2DConditionModel.from_pretrained(source)


def inflate_source(source: str, in_channels: int = 8, num_frames: int = 14, addition_time_embed_dim: int = 256):
    """(video UNet, temporal-decoder VAE or None, the ``inflation.json`` summary) of the UNet in
    ``source`` and, given a pipeline folder with a ``vae/``, its VAE (a VAE that cannot be inflated
    is skipped with its reason: the UNet stands on its own)."""
    from diffusers import AutoencoderKL

    unet, report = inflate_unet(load_image_unet(source), in_channels, num_frames, addition_time_embed_dim)
    summary = {"source": os.path.abspath(source), "in_channels": in_channels, **report,
               "counts": {k: len(v) for k, v in report.items()}}
    vae = None
    if os.path.isfile(os.path.join(source, "model_index.json")) and os.path.isdir(os.path.join(source, "vae")):
        try:
            vae, vae_report = inflate_vae(AutoencoderKL.from_pretrained(os.path.join(source, "vae")))
        except InflationError as exc:
            summary["vae"] = {"skipped": str(exc)}
        else:
            summary["vae"] = {**vae_report, "counts": {k: len(v) for k, v in vae_report.items() if isinstance(v, list)}}
    return unet, vae, summary


def widen_video_unet(unet, in_channels: int):
    """(a copy of a spatio-temporal UNet with ``in_channels`` inputs, key report): ``conv_in``'s new
    input channels start at zero, so the widened UNet ignores them at init -- a text-to-video UNet
    (4 channels) becomes an image-to-video one (8: the conditioning frame's latent concatenated)."""
    from diffusers import UNetSpatioTemporalConditionModel

    have = unet.config.in_channels
    if in_channels < have:
        raise InflationError(f"in_channels {in_channels} is fewer than the source UNet's {have}; a video UNet is only "
                             f"widened (text-to-video -> image-to-video), never narrowed")
    wide = UNetSpatioTemporalConditionModel(**{**dict(unet.config), "in_channels": in_channels})
    state = wide.state_dict()
    with torch.no_grad():
        for key, value in unet.state_dict().items():
            if key == "conv_in.weight":
                state[key].zero_()
                state[key][:, :have] = value
            else:
                state[key].copy_(value)
    wide.load_state_dict(state)
    return wide, {"mapped": list(state), "new": [], "unused": []}


def widen_source(source: str, in_channels: int):
    """(widened video UNet, the source's temporal-decoder VAE, summary) of a video pipeline folder."""
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel

    unet, report = widen_video_unet(UNetSpatioTemporalConditionModel.from_pretrained(os.path.join(source, "unet")),
                                    in_channels)
    vae = AutoencoderKLTemporalDecoder.from_pretrained(os.path.join(source, "vae"))
    summary = {"source": os.path.abspath(source), "in_channels": in_channels, "widened": True, **report,
               "counts": {k: len(v) for k, v in report.items()}}
    return unet, vae, summary


def write_summary(folder: str, summary: dict) -> None:
    with open(os.path.join(folder, "inflation.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=1)


def inflate_folder(source: str, output: str, in_channels: int = 8, num_frames: int = 14,
                   addition_time_embed_dim: int = 256) -> dict:
    """Inflate the UNet in ``source`` into the diffusers folder ``output`` (+ ``inflation.json``); given a
    pipeline folder with a ``vae/``, also its VAE into ``output/vae`` (an ``AutoencoderKLTemporalDecoder``)."""
    unet, vae, summary = inflate_source(source, in_channels, num_frames, addition_time_embed_dim)
    unet.save_pretrained(output, safe_serialization=True)
    if vae is not None:
        vae.save_pretrained(os.path.join(output, "vae"), safe_serialization=True)
    write_summary(output, summary)
    return summary


__all__ = [
    "InflationError",
    "inflate_folder",
    "inflate_source",
    "inflate_unet",
    "inflate_vae",
    "load_image_unet",
    "video_config",
    "widen_source",
    "widen_video_unet",
]
