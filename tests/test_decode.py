import io

import numpy as np
import pytest
from PIL import Image

from curation.decode import (
    DecodeConfig,
    DecodeImages,
    capped_size,
    decode_image,
    to_rgb,
)
from pipeline.corpus import bad_files, bomb_png, load_photos


def jpeg(img, **kw):
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def run(raws, **cfg):
    batch = {"key": np.array([str(i) for i in range(len(raws))], dtype=object),
             "raw_bytes": np.array(raws + [None], dtype=object)[:-1]}
    return DecodeImages(DecodeConfig(**cfg))(batch)


def test_capped_size_never_upscales():
    assert capped_size(4000, 3000, 1024) == (1024, 768)
    assert capped_size(3000, 4000, 1024) == (768, 1024)
    assert capped_size(500, 200, 1024) == (500, 200)
    assert capped_size(12288, 2048, 1024) == (1024, 171)


def test_bad_and_odd_inputs_end_as_expected():
    files = bad_files(np.random.default_rng(0), load_photos())
    names = list(files)
    out = run([files[n][0] for n in names])
    for i, n in enumerate(names):
        expected = files[n][1]
        if expected is None:
            assert out["status"][i] == "kept", (n, out["reject_reason"][i])
            assert Image.open(io.BytesIO(out["image"][i])).mode == "RGB"
        else:
            assert out["status"][i] == "rejected", n
            assert out["reject_reason"][i].startswith(expected), (n, out["reject_reason"][i])
    by = dict(zip(names, range(len(names)), strict=True))
    i = by["odd_exif_rotated.jpg"]          # stored 400x300 with orientation 6: shown 300x400
    assert (out["width"][i], out["height"][i]) == (300, 400)
    assert (out["stored_width"][i], out["stored_height"][i]) == (300, 400)
    assert out["reject_reason"][by["bad_zero_byte.jpg"]] == "decode_error: empty file"
    assert out["reject_reason"][by["bad_bomb.png"]] == "decompression_bomb: 40000x40000 exceeds max_pixels=178956970"
    assert "truncated" in out["reject_reason"][by["bad_truncated.jpg"]]
    assert all(r is None for r in out["raw_bytes"])


def test_animated_reject_policy():
    frames = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    assert run([buf.getvalue()], animated="reject")["reject_reason"][0] == "animated: 2 frames"
    kept = run([buf.getvalue()])
    img = Image.open(io.BytesIO(kept["image"][0]))
    assert np.asarray(img)[16, 16].tolist() == pytest.approx([255, 0, 0], abs=8)  # the first frame


def test_alpha_flattened_on_white_and_16bit_rescaled():
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    g16 = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert to_rgb(g16).getpixel((0, 0)) == (255, 255, 255)
    g16_half = Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16))
    assert to_rgb(g16_half).getpixel((0, 0)) == (128, 128, 128)
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))   # pure red in CMYK
    assert to_rgb(cmyk).getpixel((0, 0)) == (255, 0, 0)


def test_large_jpeg_is_capped_with_fast_draft_decode():
    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 255, (1500, 2400, 3), dtype=np.uint8))
    data = jpeg(big, quality=90)
    img, w, h = decode_image(data, DecodeConfig(max_side=512))
    assert (w, h) == (2400, 1500)
    assert img.size == (512, 320)
    slow, _, _ = decode_image(data, DecodeConfig(max_side=512, fast_jpeg=False))
    assert slow.size == (512, 320)


def test_pixel_cap_is_configurable():
    assert (
        run([bomb_png(100, 100)], max_pixels=5000)["reject_reason"][0]
        == "decompression_bomb: 100x100 exceeds max_pixels=5000"
    )


def test_rejected_rows_are_not_decoded():
    batch = {"raw_bytes": np.array([b"garbage"], dtype=object), "status": np.array(["rejected"], dtype=object),
             "reject_reason": np.array(["too_small: x"], dtype=object)}
    out = DecodeImages()(batch)
    assert out["reject_reason"][0] == "too_small: x"


def test_the_fast_path_keeps_the_full_decodes_size_and_40_db(tmp_path):
    """JPEGs at sizes that put the DCT-scaled decode at every distance from the stored size (just
    above 1x, 2x, 4x and 8x of it): the stored size is the one a full decode + resize gives, and the
    pixels stay within 40 dB PSNR of a full decode + bicubic resize."""
    import io

    import numpy as np
    from PIL import Image, ImageOps

    from curation.decode import DecodeConfig, capped_size, decode_image
    from pipeline.corpus import load_photos, synth_image

    rng = np.random.default_rng(0)
    photos = load_photos()
    cfg = DecodeConfig(max_side=512)       # the stored sizes training uses (512-1024); see bench/RESULTS.md
    worst = 99.0
    for longest in (513, 537, 665, 1049, 1331, 2099, 2560):
        for aspect in (4 / 3, 3 / 4):
            w, h = (longest, round(longest / aspect)) if aspect >= 1 else (round(longest * aspect), longest)
            arr = np.asarray(synth_image(rng, photos, w, h)).astype(np.int16)
            arr = np.clip(arr + rng.normal(0, 3, arr.shape), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, "JPEG", quality=90)
            data = buf.getvalue()
            ref = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
            ref = ref.resize(capped_size(w, h, 512), Image.Resampling.BICUBIC)
            got, ow, oh = decode_image(data, cfg)
            assert (ow, oh) == (w, h) and got.size == ref.size
            mse = np.mean((np.asarray(got, np.float64) - np.asarray(ref, np.float64)) ** 2)
            worst = min(worst, 99.0 if mse == 0 else 10 * np.log10(255 ** 2 / mse))
    assert worst >= 40.0


def _gradient_jpeg(mode: str, orientation: int = 1, w: int = 900, h: int = 600, **kw) -> bytes:
    """A JPEG whose every pixel is told apart by its position (so a wrong rotation or flip shows),
    with noise (so the shrink's filter matters), carrying EXIF ``orientation``."""
    y, x = np.mgrid[0:h, 0:w]
    noise = np.random.default_rng(orientation).normal(0, 12, (h, w, 3))
    arr = np.clip(np.stack([x * 255 / w, y * 255 / h, (x + y) % 256], -1) + noise, 0, 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg(Image.fromarray(arr).convert(mode), quality=92, exif=exif.tobytes(), **kw)


@pytest.mark.parametrize("resample", ["gaussian", "area"])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_direct_jpeg_decode_gives_pillows_pixels_in_every_orientation(monkeypatch, mode, resample):
    """Baseline JPEGs decode with OpenCV straight into the array that is shrunk, and rotate after the
    shrink; the same DCT scale, filter and EXIF orientation through Pillow give the same pixels (both
    wheels carry libjpeg-turbo; 2 levels allow for an IDCT rounding of 1 between two builds)."""
    import curation.decode as decode

    for orientation in range(1, 9):
        data = _gradient_jpeg(mode, orientation)
        for max_side in (256, 600):                   # DCT scale 1/2, and 1 (a shrink by 1.5)
            cfg = DecodeConfig(max_side=max_side, resample=resample)
            with Image.open(io.BytesIO(data)) as probe:
                assert decode._direct_jpeg(probe, cfg)
            fast, w, h = decode_image(data, cfg)
            with monkeypatch.context() as m:
                m.setattr(decode, "_direct_jpeg", lambda img, cfg: False)
                slow, sw, sh = decode_image(data, cfg)
            assert (w, h) == (sw, sh) == ((600, 900) if orientation >= 5 else (900, 600))
            assert fast.mode == slow.mode == "RGB" and fast.size == slow.size == capped_size(w, h, max_side)
            diff = np.abs(np.asarray(fast, np.int16) - np.asarray(slow, np.int16))
            assert diff.max() <= 2, (orientation, max_side)


def test_jpegs_the_direct_path_leaves_to_pillow():
    """Progressive JPEGs (Pillow feeds them in steps that ``max_seconds`` can stop), CMYK and the PIL
    filters stay on Pillow's path; a truncated baseline JPEG, which OpenCV declines, still ends as
    Pillow's truncated-file reject."""
    import curation.decode as decode

    def direct(data, **cfg):
        with Image.open(io.BytesIO(data)) as img:
            return decode._direct_jpeg(img, DecodeConfig(**cfg))

    baseline = _gradient_jpeg("RGB")
    assert direct(baseline) and direct(baseline, resample="area")
    assert not direct(baseline, resample="bicubic") and not direct(baseline, fast_jpeg=False)
    assert not direct(_gradient_jpeg("RGB", progressive=True))
    cmyk = jpeg(Image.new("CMYK", (64, 48), (0, 255, 255, 0)))
    assert not direct(cmyk)
    assert decode_image(cmyk, DecodeConfig())[0].getpixel((0, 0))[0] > 200
    out = run([baseline[: len(baseline) // 2], baseline])
    assert out["reject_reason"][0].startswith("decode_error: truncated file")
    assert out["reject_reason"][1] is None and out["stored_width"][1] == 900
