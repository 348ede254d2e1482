"""A small, seeded image corpus with every kind of bad input, for the demo, tests and benchmarks.

Photos come from ``skimage.data`` (shipped in the scikit-image wheel) cut to varied aspect
ratios and sizes; procedural images fill in when scikit-image is absent. ``make_corpus`` returns
what should happen to each file, so tests can assert exact outcomes.
"""
from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
from PIL import Image

PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "hubble_deep_field",
               "immunohistochemistry", "retina", "camera", "page", "text", "moon", "horse", "cat")
ADJECTIVES = ("a bright", "a quiet", "an old", "a detailed", "a blurry", "a colourful", "a dark", "a wide")
SUBJECTS = ("street", "garden", "harbour", "kitchen", "mountain", "library", "market", "forest")


def load_photos() -> list[np.ndarray]:
    """RGB uint8 photos from skimage.data, or procedural stand-ins when it is not installed."""
    try:
        from skimage import data
    except ImportError:
        data = None
    photos = []
    if data is not None:
        for name in PHOTO_NAMES:
            fn = getattr(data, name, None)
            if fn is None:
                continue
            try:
                arr = np.asarray(fn())
            except Exception:  # noqa: BLE001 - a missing optional data file
                continue
            if arr.dtype == bool:
                arr = arr.astype(np.uint8) * 255
            if arr.ndim == 2:
                arr = np.stack([arr] * 3, axis=-1)
            photos.append(np.ascontiguousarray(arr[..., :3]).astype(np.uint8))
    if not photos:
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[0:512, 0:512]
        for i in range(6):
            f = rng.uniform(0.01, 0.05, size=3)
            arr = np.stack([(np.sin(xx * f[c] + yy * f[(c + 1) % 3] + i) * 127 + 128) for c in range(3)], -1)
            photos.append(arr.astype(np.uint8))
    return photos


def synth_image(rng: np.random.Generator, photos: list[np.ndarray], width: int, height: int) -> Image.Image:
    """A crop of a random photo at a random aspect ratio, resized to (width, height), plus shapes."""
    src = photos[rng.integers(len(photos))]
    h, w = src.shape[:2]
    aspect = width / height
    ch = int(rng.integers(max(16, h // 3), h + 1))
    cw = min(w, max(16, int(ch * aspect)))
    ch = min(h, max(16, int(cw / aspect)))
    y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = Image.fromarray(src[y0:y0 + ch, x0:x0 + cw]).resize((width, height), Image.Resampling.BICUBIC)
    arr = np.asarray(crop).copy()
    # a coloured block so two crops of one photo never hash alike
    bh, bw = max(2, height // 4), max(2, width // 4)
    by, bx = int(rng.integers(0, height - bh + 1)), int(rng.integers(0, width - bw + 1))
    arr[by:by + bh, bx:bx + bw] = rng.integers(0, 256, size=3)
    return Image.fromarray(arr)


def caption(rng: np.random.Generator) -> str:
    return f"{ADJECTIVES[rng.integers(len(ADJECTIVES))]} photo of a {SUBJECTS[rng.integers(len(SUBJECTS))]}"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 40_000, height: int = 40_000) -> bytes:
    """A tiny PNG whose header claims width x height pixels (1-bit grey): a decompression bomb."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _png_chunk(b"IEND", b""))


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=kw.pop("quality", 90), **kw)
    return buf.getvalue()


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def bad_files(rng: np.random.Generator, photos: list[np.ndarray]) -> dict[str, tuple[bytes, str | None]]:
    """name -> (bytes, expected reject category or None when the file must be kept)."""
    base = synth_image(rng, photos, 640, 480)
    good = _jpeg(base)
    rgba = synth_image(rng, photos, 300, 200).convert("RGBA")
    alpha = np.asarray(rgba).copy()
    alpha[:, :150, 3] = 0
    rgba = Image.fromarray(alpha, "RGBA")
    pal = synth_image(rng, photos, 256, 256).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    pal.info["transparency"] = 0
    grey16 = Image.fromarray((np.linspace(0, 65535, 320 * 240).reshape(240, 320)).astype(np.uint16))
    rotated = synth_image(rng, photos, 400, 300)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display: stored 400x300, shown 300x400
    frames = [synth_image(rng, photos, 160, 120) for _ in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return {
        "bad_zero_byte.jpg": (b"", "decode_error"),
        "bad_truncated.jpg": (good[: len(good) // 2], "decode_error"),
        "bad_not_an_image.jpg": (b"this is a text file pretending to be a jpeg\n" * 20, "decode_error"),
        "bad_bomb.png": (bomb_png(), "decompression_bomb"),
        "odd_cmyk.jpg": (_jpeg(synth_image(rng, photos, 360, 240).convert("CMYK")), None),
        "odd_16bit.png": (_png(grey16), None),
        "odd_rgba.png": (_png(rgba), None),
        "odd_palette_transparent.png": (_png(pal, transparency=0), None),
        "odd_exif_rotated.jpg": (_jpeg(rotated, exif=exif.tobytes()), None),
        "odd_animated.gif": (gif.getvalue(), None),
    }


POSTER_LINES = ("GRAND OPENING", "SALE 50% OFF", "FRESH BREAD DAILY", "CITY MARATHON", "LIVE MUSIC TONIGHT",
                "NO PARKING", "WELCOME HOME", "SUMMER FESTIVAL")


def text_image(lines: list[str], size: tuple[int, int] = (640, 480), font_size: int = 48,
               background: tuple[int, int, int] = (238, 232, 220)) -> Image.Image:
    """A sign/poster: dark text lines on a plain background (PIL's bundled font, no system fonts)."""
    from PIL import ImageDraw, ImageFont

    img = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=font_size)
    y = font_size // 2
    for line in lines:
        draw.text((font_size // 2, y), line, fill=(25, 25, 30), font=font)
        y += int(font_size * 1.6)
    return img


def make_corpus(root: str, n_images: int = 200, seed: int = 0, *, bad: bool = True,
                duplicates: int = 4, min_side: int = 160, max_side: int = 1600,
                text_images: int = 0) -> dict[str, str | None]:
    """Write a corpus into ``root``; returns {relative file: expected reject category or None}."""
    rng = np.random.default_rng(seed)
    photos = load_photos()
    os.makedirs(root, exist_ok=True)
    expected: dict[str, str | None] = {}
    aspects = (1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16, 2.0, 0.5, 3 / 2, 2 / 3, 1.25)
    originals = []
    for i in range(n_images):
        aspect = aspects[i % len(aspects)]
        longest = int(rng.integers(max(min_side, 256), max_side + 1))
        w, h = (
            (longest, max(min_side, int(longest / aspect)))
            if aspect >= 1
            else (max(min_side, int(longest * aspect)), longest)
        )
        img = synth_image(rng, photos, w, h)
        sub = f"part{i % 3}"
        os.makedirs(os.path.join(root, sub), exist_ok=True)
        name = f"{sub}/img_{i:04d}"
        ext = ".png" if i % 7 == 0 else ".jpg"
        with open(os.path.join(root, name + ext), "wb") as fh:
            fh.write(_png(img) if ext == ".png" else _jpeg(img, quality=int(rng.integers(80, 96))))
        if i % 5 != 4:  # most images have a caption; some do not
            with open(os.path.join(root, name + ".txt"), "w", encoding="utf-8") as fh:
                fh.write(caption(rng))
        expected[name + ext] = None
        originals.append((name + ext, img))
    for d in range(min(duplicates, len(originals))):
        src_name, img = originals[d]
        small = img.resize((max(64, img.width * 2 // 3), max(64, img.height * 2 // 3)), Image.Resampling.BICUBIC)
        name = f"dup_{d:02d}_of_{os.path.basename(src_name).split('.')[0]}.jpg"
        with open(os.path.join(root, name), "wb") as fh:
            fh.write(_jpeg(small, quality=75))
        expected[name] = "duplicate"
    for t in range(text_images):   # text-heavy posters, for the OCR stage to find
        os.makedirs(os.path.join(root, "text"), exist_ok=True)
        lines = [POSTER_LINES[(t + k) % len(POSTER_LINES)] for k in range(4)]
        name = f"text/poster_{t:02d}.png"
        with open(os.path.join(root, name), "wb") as fh:
            fh.write(_png(text_image(lines, font_size=int(rng.integers(40, 56)))))
        with open(os.path.join(root, name[:-4] + ".txt"), "w", encoding="utf-8") as fh:
            fh.write("a poster with large printed words")
        expected[name] = None
    if bad:
        os.makedirs(os.path.join(root, "bad"), exist_ok=True)
        for name, (data, outcome) in bad_files(rng, photos).items():
            with open(os.path.join(root, "bad", name), "wb") as fh:
                fh.write(data)
            expected[f"bad/{name}"] = outcome
        # a caption that is not UTF-8 (latin-1 bytes) on a good image
        with open(os.path.join(root, "bad", "odd_cmyk.txt"), "wb") as fh:
            fh.write("café au lait, crème brûlée".encode("latin-1"))
    return expected
