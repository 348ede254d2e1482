"""Decode, verify, normalise and re-encode images at a capped size.

Handles what real crawls contain: zero-byte and truncated files, non-images, decompression
bombs (pixel cap checked from the header, before decoding), EXIF rotation, CMYK, 16-bit,
palette and alpha images (flattened on white), animated images. JPEGs are decoded at a reduced
scale (libjpeg's DCT scaling, the scale PIL's ``draft`` picks) when the cap allows it, which is most
of the speed-up over a plain open/convert/resize loop; baseline JPEGs then decode with OpenCV
straight into the array that is shrunk.
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
from pipeline.contract.media import (  # noqa: F401
    EMPTY,
    NOT_AN_IMAGE,
    MediaError,
    MediaLimits,
    decode_jpeg_scaled,
    decoded_bytes,
    open_image,
)
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
    resample: Literal["gaussian", "area", "lanczos", "bicubic", "bilinear"] = option(
        "gaussian", "downscaling filter: gaussian (an anti-alias Gaussian of sigma 0.4 x sqrt(r^2 - 1) source pixels "
        "for a shrink by r, then bilinear sampling, in OpenCV), area (the mean over each output pixel's footprint, "
        "OpenCV's INTER_AREA: 1.25x slower), or PIL's lanczos, bicubic, bilinear (PIL's path: 1.8x slower than area). "
        "gaussian and area decode baseline JPEGs with OpenCV straight into the array they shrink; all stay >= 40 dB "
        "PSNR against a full decode + bicubic on bench/curate_images.py's photos")
    max_seconds: float = option(60.0, "a sample whose decode and re-encode take longer is rejected (decode_timeout); "
                                "0 turns the limit off. Enforced where the stage runs as a Ray task (its default)",
                                min=0)


_RESAMPLE = {"lanczos": Image.Resampling.LANCZOS, "bicubic": Image.Resampling.BICUBIC,
             "bilinear": Image.Resampling.BILINEAR, "area": Image.Resampling.BOX,      # BOX, BICUBIC: what
            "gaussian": Image.Resampling.BICUBIC}                                  # OpenCV cannot shrink


# A JPEG decoded at a reduced DCT scale (PIL draft) is already low-passed; a second resize by a
# factor near 1 then blurs it again: 37 dB PSNR against a full decode + bicubic on a 2,179 px photo
# capped at 1,024 (drafted to 1,090). Asking the draft for 1.25x the stored size leaves at least that
# factor to the final filter: >= 40 dB on every photo of bench/curate_images.py, at 8 % of the speed.
DRAFT_MARGIN = 1.25


# Gaussian anti-alias prefilter for ``resample: gaussian``: sigma = GAUSS_SIGMA * sqrt(r^2 - 1) source
# pixels for a shrink by r. The sqrt(r^2 - 1) is the blur still to add to an image whose own sampling
# already counts as a blur of 1 pixel (the incremental blur of scale-space pyramids, Lowe 2004); 0.4
# passes 45 % at the target's Nyquist frequency, less than the box of area averaging (64 %), and has
# no side lobes above it.
GAUSS_SIGMA = 0.4


def _shrink_array(arr: np.ndarray, size: tuple[int, int], resample: str) -> np.ndarray:
    """An 8-bit (H, W[, C]) array shrunk to ``size`` (w, h) with OpenCV: ``area`` averages each
    output pixel's footprint (INTER_AREA); ``gaussian`` blurs by the incremental sigma above, then
    samples bilinearly: the same anti-aliasing for about half of area's time after a DCT-scaled
    decode (its general, non-integer path is OpenCV's slow one)."""
    import cv2

    if resample == "gaussian":
        rx, ry = arr.shape[1] / size[0], arr.shape[0] / size[1]
        sx, sy = (GAUSS_SIGMA * float(np.sqrt(max(r * r - 1.0, 0.0))) for r in (rx, ry))
        if max(sx, sy) >= 0.1:
            arr = cv2.GaussianBlur(arr, (0, 0), sigmaX=max(sx, 1e-3), sigmaY=max(sy, 1e-3))
        return cv2.resize(arr, size, interpolation=cv2.INTER_LINEAR)
    return cv2.resize(arr, size, interpolation=cv2.INTER_AREA)


def shrink(img: Image.Image, size: tuple[int, int], resample: str) -> Image.Image:
    """``img`` resized to ``size``: 8-bit RGB or grey by OpenCV (``area``, ``gaussian``: see
    ``_shrink_array``; neither can alias much), anything else by PIL's filter."""
    if resample in ("area", "gaussian") and img.mode in ("RGB", "L") and size[0] <= img.width and size[1] <= img.height:
        return Image.fromarray(_shrink_array(np.asarray(img), size, resample), img.mode)
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


def to_rgb(img: Image.Image, size: tuple[int, int] | None = None, resample: str = "bicubic") -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; alpha is flattened on white, 16/32-bit rescaled. A grey
    image is resized to ``size`` (when given, with ``shrink``'s ``resample``) before it is widened to
    RGB, so the four-byte RGB copy is made of the small image only."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I", "F", "L"):
        grey = _to_grey8(img) if mode != "L" else img
        if size is not None and size != grey.size:
            grey = shrink(grey, size, resample)
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
    if _direct_jpeg(img, cfg):
        fast = _decode_jpeg_direct(data, img, (width, height), orientation, cfg.max_side, cfg.resample)
        if fast is not None:
            img.close()
            return fast, orig_w, orig_h
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
            if orientation != 1:
                img = ImageOps.exif_transpose(img)
            # the stored size follows from the full image's size, not the DCT-scaled one (whose
            # sides are rounded up): the same size as a full decode + resize would give
            img = to_rgb(img, capped_size(orig_w, orig_h, cfg.max_side), cfg.resample)
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


# EXIF orientation -> the same pixel permutation as ImageOps.exif_transpose, on an (H, W, C) array
_ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: a[::-1].transpose(1, 0, 2),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: a[:, ::-1].transpose(1, 0, 2),
}


def _direct_jpeg(img: Image.Image, cfg: DecodeConfig) -> bool:
    """Whether ``img`` (opened, checked and drafted by ``open_image``) takes the direct path: a
    baseline 8-bit colour or grey JPEG shrunk by area averaging. Progressive JPEGs stay with Pillow,
    which decodes them in 64 KB steps that ``time_limit`` can stop (a progressive file can ask for
    thousands of scans); CMYK/YCCK, MPO and the other filters stay there too."""
    return (cfg.fast_jpeg and cfg.resample in ("area", "gaussian") and img.format == "JPEG" and img.mode in ("RGB", "L")
            and not img.info.get("progressive") and not img.info.get("progression"))


def _decode_jpeg_direct(data: bytes, img: Image.Image, full: tuple[int, int], orientation: int,
                        max_side: int, resample: str) -> Image.Image | None:
    """Decode a baseline JPEG with OpenCV's libjpeg-turbo straight into the array that is resized:
    the DCT scale Pillow's ``draft`` chose (so the same >= 1.25x margin), the shrink to the
    stored size before the EXIF rotation (a pixel permutation, done on the small image), and no
    Pillow -> numpy copy of the large decode, which is what makes it ~10 % faster than the same
    steps through Pillow. Returns None where OpenCV declines (truncated data: libjpeg's error
    there, not a grey-filled image) so that Pillow's path gives the reject reason. The header was
    checked by ``open_image``; a baseline decode's time is linear in its pixels (``max_pixels``)."""
    import cv2

    width, height = full
    arr = decode_jpeg_scaled(data, img, width)
    if arr is None:
        return None
    size = capped_size(width, height, max_side)          # before rotation; capped_size is symmetric
    if size != (img.width, img.height):
        arr = _shrink_array(arr, size, resample)
    arr = cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)        # a grey JPEG comes out as three equal planes
    if orientation in _ORIENT:
        arr = np.ascontiguousarray(_ORIENT[orientation](arr))
    return Image.fromarray(arr, "RGB")


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

