"""The one place winnow opens image and video bytes: every open checks the pixel count (and, for
images, the decoded size) from the header before anything is decoded, wherever it happens --
curation, training's loader, reports, sheets, eval. ``tests/test_architecture.py`` checks that no
other module calls Pillow's, PyAV's or OpenCV's open.

A refusal is a ``MediaError`` whose message is the reject reason (``decode_error: ...``,
``decompression_bomb: ...``, ``too_large: ...``), so a stage can record it as it is.
"""
from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

# winnow enforces its own caps from the header (below); PIL's global guard would raise before a
# reason can be recorded, so it is lifted once, here, for every module that opens images.
Image.MAX_IMAGE_PIXELS = None

NOT_AN_IMAGE = "decode_error: not an image"
EMPTY = "decode_error: empty file"


class MediaError(Exception):
    """Media that is refused before decoding; the message is the reject reason."""


@dataclass(frozen=True)
class MediaLimits:
    """Caps checked from the header, before decoding."""
    max_pixels: int = 178_956_970               # width x height (PIL's own bomb limit)
    max_decoded_bytes: int = 4 * 178_956_970    # what Pillow allocates for the decoded image
    max_file_bytes: int | None = None           # a path larger than this is not opened


LIMITS = MediaLimits()
# Previews (report thumbnails, contact sheets): a thumbnail needs no 178-megapixel decode. 64 MP
# frames and 256 MB decoded keep a preview of any one sample well under 512 MB.
PREVIEW = MediaLimits(max_pixels=64_000_000, max_decoded_bytes=256 << 20, max_file_bytes=2 << 30)
# Video frames: 8K UHD, as video.probe's default (an FFmpeg decoder is given the cap too, so a
# bigger frame is never allocated, even while the container's parameters are read).
VIDEO = MediaLimits(max_pixels=7680 * 4320, max_decoded_bytes=4 * 7680 * 4320)
VIDEO_PREVIEW = MediaLimits(max_pixels=3840 * 2160, max_decoded_bytes=4 * 3840 * 2160, max_file_bytes=2 << 30)


def decoded_bytes(width: int, height: int, mode: str) -> int:
    """Bytes Pillow holds for a decoded image: one per pixel for grey and palette, two for 16-bit,
    four for every other mode (Pillow pads RGB to four bytes a pixel)."""
    per = 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4
    return width * height * per


def _source(source, limits: MediaLimits, error: str = "decode_error"):
    """bytes -> a file object; a path is checked against ``max_file_bytes`` and must be a regular file."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise MediaError(f"{error}: empty file")
        return io.BytesIO(source)
    if isinstance(source, (str, os.PathLike)):
        try:
            st = os.stat(source)
        except OSError as exc:
            raise MediaError(f"{error}: {exc.strerror or exc}") from None
        import stat

        if not stat.S_ISREG(st.st_mode):
            raise MediaError(f"{error}: not a regular file")
        if st.st_size == 0:
            raise MediaError(f"{error}: empty file")
        if limits.max_file_bytes is not None and st.st_size > limits.max_file_bytes:
            raise MediaError(f"too_large: {st.st_size} bytes > {limits.max_file_bytes}")
    return source


def open_image(source, limits: MediaLimits = LIMITS,
               draft: tuple[int, int] | Callable[[int, int], tuple[int, int] | None] | None = None,
               draft_mode: str = "RGB") -> Image.Image:
    """Open image bytes, a path or a file object, checked before decoding: pixels against
    ``max_pixels``, then (after a JPEG ``draft`` to at least ``draft`` pixels, which libjpeg decodes
    at a reduced DCT scale) the decoded bytes against ``max_decoded_bytes``. ``draft`` may be a
    function of the full (width, height). Returns the still-lazy image: use it in a ``with``."""
    fh = _source(source, limits)
    try:
        img = Image.open(fh)
    except UnidentifiedImageError:
        raise MediaError(NOT_AN_IMAGE) from None
    except Exception as exc:  # noqa: BLE001 - any parser failure is a bad sample
        raise MediaError(f"decode_error: {type(exc).__name__}: {exc}") from None
    try:
        width, height = img.size
        if width <= 0 or height <= 0:
            raise MediaError("decode_error: zero-sized image")
        if width * height > limits.max_pixels:
            raise MediaError(f"decompression_bomb: {width}x{height} exceeds max_pixels={limits.max_pixels}")
        target = draft(width, height) if callable(draft) else draft
        if target is not None and img.format == "JPEG" and tuple(target) != (width, height):
            img.draft(draft_mode, tuple(target))
        need = decoded_bytes(img.width, img.height, img.mode)     # after draft: what decoding allocates
        if need > limits.max_decoded_bytes:
            raise MediaError(f"decompression_bomb: {width}x{height} {img.mode} decodes to {need} bytes > "
                             f"max_decoded_bytes={limits.max_decoded_bytes}")
    except BaseException:
        img.close()
        raise
    return img


# OpenCV's imdecode flags for libjpeg's DCT scales 1, 1/2, 1/4, 1/8 (the ones PIL's draft picks)
_CV_SCALE = {1: "IMREAD_COLOR", 2: "IMREAD_REDUCED_COLOR_2", 4: "IMREAD_REDUCED_COLOR_4", 8: "IMREAD_REDUCED_COLOR_8"}


def decode_jpeg_scaled(data: bytes, img: Image.Image, full_width: int):
    """The pixels of ``img``, a JPEG that ``open_image`` opened, checked and drafted from ``data``,
    decoded by OpenCV's libjpeg-turbo at the same DCT scale straight into a BGR (H, W, 3) uint8
    array (grey comes out as three equal planes), EXIF orientation not applied. None where the draft
    is not one of libjpeg's scales, or where OpenCV declines: a truncated file is libjpeg's error
    there, never a grey-filled image, so the caller's Pillow path gives the reject reason. The
    size is the checked one: OpenCV allocates exactly the drafted image."""
    import cv2

    scale = max(1, round(full_width / img.width))
    if scale not in _CV_SCALE or -(-full_width // scale) != img.width:
        return None
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), getattr(cv2, _CV_SCALE[scale]) | cv2.IMREAD_IGNORE_ORIENTATION)
    if arr is None or arr.ndim != 3 or arr.shape[:2] != (img.height, img.width):
        return None
    return arr


def open_video(source, limits: MediaLimits = VIDEO):
    """Open a video container (bytes, a path or a file object) for reading. FFmpeg's decoders get
    ``max_pixels`` (a frame over it is never allocated, even while the container's parameters are
    read), and a first video stream over it is refused before any frame is decoded."""
    import av

    av.logging.set_libav_level(av.logging.ERROR)
    src = _source(source, limits, "probe_error")
    try:   # FFmpeg's option is an int capped at INT_MAX
        container = av.open(src, options={"max_pixels": str(min(limits.max_pixels, 2 ** 31 - 1))})
    except av.error.FFmpegError as exc:
        raise MediaError(f"probe_error: {type(exc).__name__}: {exc}") from None
    except (OSError, ValueError) as exc:
        raise MediaError(f"probe_error: {exc}") from None
    try:
        for stream in container.streams.video[:1]:
            w, h = stream.codec_context.width, stream.codec_context.height
            if w < 0 or h < 0 or w * h > limits.max_pixels:
                raise MediaError(f"too_large: {w}x{h} frames exceed max_frame_pixels={limits.max_pixels}")
    except BaseException:
        container.close()
        raise
    return container


def video_frame(source, at_s: float = 0.0, limits: MediaLimits = VIDEO_PREVIEW) -> Image.Image | None:
    """The first frame at or after ``at_s`` seconds (seeking to the keyframe before it) as RGB, or
    None when the stream has none; refused like ``open_video``."""
    with open_video(source, limits) as c:
        if not c.streams.video:
            return None
        stream = c.streams.video[0]
        if at_s and stream.time_base:
            c.seek(int(at_s / stream.time_base), stream=stream)
        last = None
        for frame in c.decode(stream):
            last = frame
            if not at_s or frame.time is None or frame.time >= at_s - 1e-3:
                break
        return last.to_image() if last is not None else None


def video_frames(source, positions=(0.0, 0.5, 1.0), limits: MediaLimits = VIDEO_PREVIEW) -> list[Image.Image]:
    """The frames at ``positions`` (fractions of the frame count: 0 the first, 1 the last) of a
    video as RGB, one per position (empty when it has none). Packets are counted first (demux
    only), so only the chosen frames are kept."""
    if isinstance(source, (bytes, bytearray)):
        source = bytes(source)
    with open_video(source, limits) as c:
        if not c.streams.video:
            return []
        n = sum(1 for p in c.demux(c.streams.video[0]) if p.size)
    if n == 0:
        return []
    index = [min(n - 1, max(0, round(p * (n - 1)))) for p in positions]
    want = set(index)
    got: dict[int, Image.Image] = {}
    with open_video(source, limits) as c:
        for i, frame in enumerate(c.decode(video=0)):
            if i in want:
                got[i] = frame.to_image()
            if len(got) == len(want):
                break
    if got and len(got) < len(want):        # fewer decodable frames than packets: the last one stands in
        last = got[max(got)]
        got.update({i: last for i in want if i not in got})
    return [got[i] for i in index] if got else []


def write_gif(frames: list[Image.Image], target, fps: float) -> None:
    """An animated GIF of ``frames`` at ``fps``, looping (a path or a file object)."""
    frames[0].save(target, format="GIF", save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)


def gif_frames(source, limits: MediaLimits = LIMITS, max_frames: int = 1024) -> list[Image.Image]:
    """The frames of an animated image as RGB: each frame's size is checked as ``open_image``
    checks it, and the frames together against ``max_decoded_bytes`` and ``max_frames``."""
    out, total = [], 0
    with open_image(source, limits) as im:
        for i in range(getattr(im, "n_frames", 1)):
            if i >= max_frames:
                raise MediaError(f"decompression_bomb: more than max_frames={max_frames} frames")
            im.seek(i)
            total += decoded_bytes(im.width, im.height, "RGB")
            if total > limits.max_decoded_bytes:
                raise MediaError(f"decompression_bomb: {i + 1} frames decode to more than "
                                 f"max_decoded_bytes={limits.max_decoded_bytes}")
            out.append(im.convert("RGB"))
    return out
