"""Decode, verify, normalise and re-encode images at a capped size.

Handles what real crawls contain: zero-byte and truncated files, non-images, decompression
bombs (pixel cap checked from the header, before decoding), EXIF rotation, CMYK, 16-bit,
palette and alpha images (flattened on white), animated images. JPEGs are decoded at a reduced
scale with PIL's ``draft`` when the cap allows it (libjpeg's DCT scaling), which is most of the
speed-up over a plain open/convert/resize loop.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from pipeline.config import option
from pipeline.stage import (
    HEIGHT,
    IMAGE,
    IMAGE_EXT,
    RAW,
    STORED_HEIGHT,
    STORED_WIDTH,
    WIDTH,
    Stage,
    active,
    column,
    reject,
)

ImageFile.LOAD_TRUNCATED_IMAGES = False
# We enforce our own pixel cap from the header; PIL's global guard would raise before we can
# record a reason, so it is lifted here and replaced by ``max_pixels``.
Image.MAX_IMAGE_PIXELS = None

EXTENSIONS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


@dataclass
class DecodeConfig:
    max_side: int = option(1024, "longest side of the stored image; never upscaled", min=16)
    max_pixels: int = option(178_956_970, "decompression-bomb cap: reject images with more pixels (PIL's default)", min=1)
    animated: Literal["first_frame", "reject"] = option("first_frame", "animated GIF/PNG/WebP: keep the first frame or reject")
    format: Literal["jpg", "png", "webp"] = option("jpg", "encoding of the stored image")
    quality: int = option(95, "JPEG/WebP quality", min=1, max=100)
    fast_jpeg: bool = option(True, "decode JPEGs at a reduced DCT scale when the cap allows (PIL draft)")
    resample: Literal["lanczos", "bicubic", "bilinear"] = option("bicubic", "downscaling filter")


_RESAMPLE = {"lanczos": Image.Resampling.LANCZOS, "bicubic": Image.Resampling.BICUBIC,
             "bilinear": Image.Resampling.BILINEAR}


class DecodeError(Exception):
    """A sample that cannot become a training image; the message is the reject reason."""


def capped_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Size with the longest side at most ``max_side``, aspect kept, never upscaled."""
    longest = max(width, height)
    if longest <= max_side:
        return width, height
    scale = max_side / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; alpha is flattened on white, 16/32-bit rescaled."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "CMYK":
        # PIL stores Adobe CMYK JPEGs inverted; convert() handles both layouts.
        return img.convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes, cfg: DecodeConfig) -> tuple[Image.Image, int, int]:
    """Open ``data`` and return (RGB image capped to ``max_side``, original width, original height).

    The original size is after EXIF rotation, i.e. the size a viewer shows.
    """
    if data is None or len(data) == 0:
        raise DecodeError("decode_error: empty file")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise DecodeError("decode_error: not an image") from None
    except Exception as exc:  # noqa: BLE001 - any parser failure is a bad sample
        raise DecodeError(f"decode_error: {type(exc).__name__}: {exc}") from None
    width, height = img.size
    if width <= 0 or height <= 0:
        raise DecodeError("decode_error: zero-sized image")
    if width * height > cfg.max_pixels:
        raise DecodeError(f"decompression_bomb: {width}x{height} exceeds max_pixels={cfg.max_pixels}")
    if getattr(img, "is_animated", False) and getattr(img, "n_frames", 1) > 1:
        if cfg.animated == "reject":
            raise DecodeError(f"animated: {img.n_frames} frames")
        img.seek(0)
    orientation = 1
    try:
        orientation = img.getexif().get(0x0112, 1) or 1
    except Exception:  # noqa: BLE001 - broken EXIF is not a broken image
        orientation = 1
    swapped = orientation in (5, 6, 7, 8)
    orig_w, orig_h = (height, width) if swapped else (width, height)
    target_w, target_h = capped_size(width, height, cfg.max_side)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if cfg.fast_jpeg and img.format == "JPEG" and (target_w, target_h) != (width, height):
                img.draft("RGB", (target_w, target_h))
            img.load()
            if orientation != 1:
                img = ImageOps.exif_transpose(img)
            img = to_rgb(img)
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"decompression_bomb: {exc}") from None
    except Exception as exc:  # noqa: BLE001
        msg = str(exc).split("\n")[0]
        if "truncated" in msg.lower() or isinstance(exc, (OSError, SyntaxError)) and "broken" in msg.lower():
            raise DecodeError(f"decode_error: truncated file ({msg})") from None
        raise DecodeError(f"decode_error: {type(exc).__name__}: {msg}") from None
    new_w, new_h = capped_size(img.width, img.height, cfg.max_side)
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), _RESAMPLE[cfg.resample], reducing_gap=3.0)
    return img, orig_w, orig_h


def encode_image(img: Image.Image, cfg: DecodeConfig) -> bytes:
    buf = io.BytesIO()
    fmt = EXTENSIONS[cfg.format]
    if fmt == "JPEG":
        img.save(buf, fmt, quality=cfg.quality, subsampling=0 if cfg.quality >= 90 else 2)
    elif fmt == "WEBP":
        img.save(buf, fmt, quality=cfg.quality, method=4)
    else:
        img.save(buf, fmt, compress_level=3)
    return buf.getvalue()


class DecodeImages(Stage):
    """Turn raw bytes into a verified RGB image stored at a capped size; bad files become rejects."""

    name = "decode"
    Config = DecodeConfig
    num_cpus = 1.0
    batch_size = 16

    def __init__(self, config: DecodeConfig | None = None):
        super().__init__(config or DecodeConfig())

    def __call__(self, batch):
        cfg = self.config
        keep = active(batch)
        raw = batch[RAW]
        images = column(batch, IMAGE)
        exts = column(batch, IMAGE_EXT)
        widths, heights = column(batch, WIDTH), column(batch, HEIGHT)
        sw, sh = column(batch, STORED_WIDTH), column(batch, STORED_HEIGHT)
        for i in range(len(raw)):
            if not keep[i]:
                continue
            try:
                img, w, h = decode_image(raw[i], cfg)
                images[i] = encode_image(img, cfg)
            except DecodeError as exc:
                reject(batch, i, str(exc))
                continue
            exts[i] = cfg.format
            widths[i], heights[i] = w, h
            sw[i], sh[i] = img.width, img.height
        batch[RAW] = np.array([None] * len(raw), dtype=object)  # raw bytes are not kept
        return batch

