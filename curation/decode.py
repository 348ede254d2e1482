"""Decode, verify, normalise and re-encode images at a capped size.

Handles what real crawls contain: zero-byte and truncated files, non-images, decompression
bombs (pixel cap checked from the header, before decoding), EXIF rotation, CMYK, 16-bit,
palette and alpha images (flattened on white), animated images. JPEGs are decoded at a reduced
scale with PIL's ``draft`` when the cap allows it (libjpeg's DCT scaling), which is most of the
speed-up over a plain open/convert/resize loop.
"""
from __future__ import annotations

import contextlib
import io
import os
import signal
import threading
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageFile, ImageOps

from pipeline.contract.config import option
from pipeline.contract.media import EMPTY, NOT_AN_IMAGE, MediaError, MediaLimits, decoded_bytes, open_image  # noqa: F401
from pipeline.contract.schema import HEIGHT, IMAGE, IMAGE_EXT, IMAGE_EXTENSIONS, RAW, STORED_HEIGHT, STORED_WIDTH, WIDTH
from pipeline.contract.stage import Stage, active, column, reject

ImageFile.LOAD_TRUNCATED_IMAGES = False
try:                                    # HEIC / HEIF (phone cameras) through libheif
    import pillow_heif

    pillow_heif.register_heif_opener()
except ImportError:                     # an older install without it: such files are unsupported_format rows
    pass

EXTENSIONS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


@dataclass
class DecodeConfig:
    max_side: int = option(1024, "longest side of the stored image; never upscaled", min=16)
    max_pixels: int = option(
        178_956_970, "decompression-bomb cap: reject images with more pixels (PIL's default)", min=1
    )
    max_decoded_bytes: int = option(4 * 178_956_970, "memory cap: reject images whose decoded pixels take more bytes "
                                    "(width x height x bytes per pixel as Pillow holds them: 1 for grey or palette, "
                                    "2 for 16-bit, 4 for colour), checked from the header before decoding", min=1)
    animated: Literal["first_frame", "reject"] = option(
        "first_frame", "animated GIF/PNG/WebP: keep the first frame or reject"
    )
    format: Literal["jpg", "png", "webp"] = option("jpg", "encoding of the stored image")
    quality: int = option(95, "JPEG/WebP quality", min=1, max=100)
    fast_jpeg: bool = option(True, "decode JPEGs at a reduced DCT scale when the cap allows (PIL draft)")
    resample: Literal["area", "lanczos", "bicubic", "bilinear"] = option(
        "area", "downscaling filter: area (the mean over each output pixel's footprint, OpenCV's INTER_AREA: "
        "anti-aliased, 1.8x faster than bicubic after a DCT-scaled decode; >= 42 dB PSNR against a full decode "
        "+ bicubic on bench/curate_images.py's photos), or PIL's lanczos, bicubic, bilinear")
    max_seconds: float = option(60.0, "a sample whose decode and re-encode take longer is rejected (decode_timeout); "
                                "0 turns the limit off. Enforced where the stage runs as a Ray task (its default)",
                                min=0)


_RESAMPLE = {"lanczos": Image.Resampling.LANCZOS, "bicubic": Image.Resampling.BICUBIC,
             "bilinear": Image.Resampling.BILINEAR, "area": Image.Resampling.BOX}   # BOX: grey 16-bit inputs only


# A JPEG decoded at a reduced DCT scale (PIL draft) is already low-passed; a second resize by a
# factor near 1 then blurs it again: 37 dB PSNR against a full decode + bicubic on a 2,179 px photo
# capped at 1,024 (drafted to 1,090). Asking the draft for 1.25x the stored size leaves at least that
# factor to the final filter: >= 40 dB on every photo of bench/curate_images.py, at 8 % of the speed.
DRAFT_MARGIN = 1.25


def shrink(img: Image.Image, size: tuple[int, int], resample: str) -> Image.Image:
    """``img`` resized to ``size``: 8-bit RGB or grey by area averaging in OpenCV (the mean of the
    source pixels each output pixel covers, which cannot alias), anything else by PIL's filter."""
    if resample == "area" and img.mode in ("RGB", "L") and size[0] <= img.width and size[1] <= img.height:
        import cv2

        return Image.fromarray(cv2.resize(np.asarray(img), size, interpolation=cv2.INTER_AREA), img.mode)
    return img.resize(size, _RESAMPLE[resample], reducing_gap=3.0)




class DecodeError(Exception):
    """A sample that cannot become a training image; the message is the reject reason."""


class DecodeTimeout(BaseException):
    """Raised by ``time_limit`` inside a decode; a BaseException so no ``except Exception`` in a
    decoder swallows it."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise ``DecodeTimeout`` when the block runs longer than ``seconds`` of wall time (SIGALRM). A
    Python signal handler runs between bytecodes, and Pillow feeds its decoders 64 KB at a time from
    Python, so a slow decode is stopped within one chunk. Only the main thread can take signals (Ray
    runs tasks there): elsewhere, or with 0, the block runs unbounded."""
    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise DecodeTimeout()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def capped_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Size with the longest side at most ``max_side``, aspect kept, never upscaled."""
    longest = max(width, height)
    if longest <= max_side:
        return width, height
    scale = max_side / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def _to_grey8(img: Image.Image, strip_bytes: int = 16 << 20) -> Image.Image:
    """16/32-bit or float grey -> 8-bit grey, in strips: no float64 copy of the whole image, so the
    peak stays near the decoded size plus the 8-bit result. 16-bit scales by 65535; ``I``/``F``
    images scale by 65535 when their values exceed 255, else by 255."""
    lo_v, hi_v = img.getextrema()
    hi = 65535.0 if img.mode.startswith("I;16") or (hi_v or 0) > 255 else 255.0
    w, h = img.size
    out = np.empty((h, w), dtype=np.uint8)
    rows = max(1, strip_bytes // max(1, w * 4))
    for top in range(0, h, rows):
        strip = np.asarray(img.crop((0, top, w, min(h, top + rows))), dtype=np.float32)
        np.clip(strip * np.float32(255.0 / hi) + np.float32(0.5), 0, 255, out=strip)
        out[top:top + strip.shape[0]] = strip.astype(np.uint8)
    return Image.fromarray(out, "L")


def to_rgb(img: Image.Image, size: tuple[int, int] | None = None,
           resample: Image.Resampling = Image.Resampling.BICUBIC) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; alpha is flattened on white, 16/32-bit rescaled. A grey
    image is resized to ``size`` (when given) before it is widened to RGB, so the four-byte RGB copy
    is made of the small image only."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I", "F", "L"):
        grey = _to_grey8(img) if mode != "L" else img
        if size is not None and size != grey.size:
            grey = grey.resize(size, resample, reducing_gap=3.0)
        return grey.convert("RGB")
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
        raise DecodeError(EMPTY)
    limits = MediaLimits(max_pixels=cfg.max_pixels, max_decoded_bytes=cfg.max_decoded_bytes)
    full = []

    def draft(w: int, h: int):     # JPEGs decode at a reduced DCT scale that still covers the capped size x margin
        full.append((w, h))
        if not cfg.fast_jpeg:
            return None
        tw, th = capped_size(w, h, cfg.max_side)
        return (min(w, int(tw * DRAFT_MARGIN)), min(h, int(th * DRAFT_MARGIN)))

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = open_image(data, limits, draft=draft)
    except MediaError as exc:
        raise DecodeError(str(exc)) from None
    width, height = full[0]
    if getattr(img, "is_animated", False) and getattr(img, "n_frames", 1) > 1:
        if cfg.animated == "reject":
            n = img.n_frames
            img.close()
            raise DecodeError(f"animated: {n} frames")
        img.seek(0)
    orientation = 1
    try:
        orientation = img.getexif().get(0x0112, 1) or 1
    except Exception:  # noqa: BLE001 - broken EXIF is not a broken image
        orientation = 1
    swapped = orientation in (5, 6, 7, 8)
    orig_w, orig_h = (height, width) if swapped else (width, height)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
            if orientation != 1:
                img = ImageOps.exif_transpose(img)
            # the stored size follows from the full image's size, not the DCT-scaled one (whose
            # sides are rounded up): the same size as a full decode + resize would give
            img = to_rgb(img, capped_size(orig_w, orig_h, cfg.max_side), _RESAMPLE[cfg.resample])
    except DecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"decompression_bomb: {exc}") from None
    except Exception as exc:  # noqa: BLE001
        msg = str(exc).split("\n")[0]
        if "truncated" in msg.lower() or isinstance(exc, (OSError, SyntaxError)) and "broken" in msg.lower():
            raise DecodeError(f"decode_error: truncated file ({msg})") from None
        raise DecodeError(f"decode_error: {type(exc).__name__}: {msg}") from None
    new_w, new_h = capped_size(orig_w, orig_h, cfg.max_side)
    if (new_w, new_h) != img.size:
        img = shrink(img, (new_w, new_h), cfg.resample)
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
        paths, offsets = batch.get("ref_path"), batch.get("ref_offset")     # the file a sample was read from
        for i in range(len(raw)):
            if not keep[i]:
                continue
            try:
                with time_limit(cfg.max_seconds):
                    img, w, h = decode_image(raw[i], cfg)
                    images[i] = encode_image(img, cfg)
            except DecodeTimeout:
                reject(batch, i, f"decode_timeout: more than max_seconds={cfg.max_seconds:g} s")
                continue
            except DecodeError as exc:
                reason = str(exc)
                whole_file = int(offsets[i]) < 0 if offsets is not None and offsets[i] is not None else False
                ext = os.path.splitext(str(paths[i] or ""))[1].lower() if whole_file else ""
                if reason == NOT_AN_IMAGE and whole_file and ext not in IMAGE_EXTENSIONS:
                    # identified by content: a file without an image name that no image decoder reads
                    reason = f"unsupported_format: {ext or 'no extension'} is not an image Pillow reads"
                reject(batch, i, reason)
                continue
            exts[i] = cfg.format
            widths[i], heights[i] = w, h
            sw[i], sh[i] = img.width, img.height
        batch[RAW] = np.array([None] * len(raw), dtype=object)  # raw bytes are not kept
        return batch

