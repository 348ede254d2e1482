"""Synthetic captions: ``caption_coca`` from open_clip's CoCa on an image, or on a clip's middle
frame as the SVD paper captioned LVD (``pipeline.models.captioner``). The source caption is kept
beside it. A caption the model makes poorly is still written, with ``caption_issue`` saying why
(``empty``, ``max_new_tokens``, ``degenerate``); a picture that cannot be read is a rejected row.
Greedy decoding: a caption depends on its picture alone, not on the batch, the worker or the run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from curation.models import ModelRuntime, ModelStage, torch_device
from pipeline.contract.config import ConfigError, option
from pipeline.contract.media import open_image
from pipeline.contract.schema import CAPTION_COCA, CAPTION_ISSUE, KEPT, STATUS
from pipeline.contract.stage import active, column, reject, sample_images
from pipeline.models import clip as clip_models
from pipeline.models.captioner import MAX_TOKENS, CocaCaptioner
from pipeline.models.clip import TINY_COCA


@dataclass
class CaptionConfig(ModelRuntime):
    backends: list[Literal["coca"]] = option(
        help="captioners to run, in order: coca (open_clip's CoCa on the picture; on a clip its middle frame)",
        factory=lambda: ["coca"])
    coca_model: str = option(TINY_COCA, f"open_clip CoCa model (coca_ViT-L-14, coca_ViT-B-32); {TINY_COCA!r} is a "
                             "~3M-parameter random model for tests and the demo")
    coca_pretrained: str | None = option(None, "open_clip tag (mscoco_finetuned_laion2b_s13b_b90k), a weights file, "
                                         "a folder with open_clip_config.json, 'hf-hub:org/repo', or 'random'")
    cache_dir: str | None = option(None, "Hugging Face hub cache to look in for tags and hf-hub ids")
    allow_download: bool = option(False, "let open_clip download missing weights (needs network)")
    seed: int = option(0, "seed of random weights ('random' or the tiny model)")
    max_new_tokens: int = option(30, "the longest caption, in tokens", min=1, max=MAX_TOKENS)
    batch_size: int = option(16, "pictures per model call", min=1, runtime=True)


def _resolve(config: CaptionConfig, key: str):
    """The CoCa weights as local files, or a ConfigError naming ``coca_model`` / ``coca_pretrained``."""
    try:
        return clip_models.resolve_weights(config.coca_model, config.coca_pretrained, config.cache_dir,
                                           config.allow_download, f"{key}.coca")
    except ConfigError as exc:
        raise ConfigError(str(exc).replace(f"{key}.coca.", f"{key}.coca_")) from None


class CaptionImages(ModelStage):
    """Adds ``caption_coca`` and ``caption_issue``."""

    name = "caption"
    Config = CaptionConfig

    @classmethod
    def validate(cls, config: CaptionConfig, key: str, earlier: list[tuple[str, Any]]) -> None:
        super().validate(config, key, earlier)
        if not config.backends:
            raise ConfigError(f"{key}.backends: give at least one captioner (coca), or remove the stage")
        if len(set(config.backends)) != len(config.backends):
            raise ConfigError(f"{key}.backends: {config.backends} names a captioner twice")
        if not config.coca_model.replace("/", "-").startswith(("coca", TINY_COCA)):
            raise ConfigError(f"{key}.coca_model: {config.coca_model!r} is not a CoCa model; give coca_ViT-L-14, "
                              f"coca_ViT-B-32 or {TINY_COCA}")
        _resolve(config, key)

    @classmethod
    def notices(cls, config: CaptionConfig, earlier: list[tuple[str, Any]]) -> list[str]:
        if not clip_models.is_random(config.coca_pretrained):
            return []
        return [f"caption: {config.coca_model} runs on random weights (coca_pretrained: "
                f"{config.coca_pretrained or 'none'}), so caption_coca is noise; give real weights in "
                f"caption.coca_pretrained (coca_ViT-L-14 with mscoco_finetuned_laion2b_s13b_b90k)"]

    def __init__(self, config: CaptionConfig | None = None):
        super().__init__(config or CaptionConfig())
        cfg = self.config
        self.coca = CocaCaptioner(cfg.coca_model, cfg.coca_pretrained, cfg.seed, torch_device(cfg), cfg.max_new_tokens,
                                  cfg.cache_dir, cfg.allow_download)

    def _prepare(self, data: bytes):
        with open_image(data) as im:
            return self.coca.prepare(im)

    def __call__(self, batch):
        keep = active(batch)
        captions, issues = column(batch, CAPTION_COCA), column(batch, CAPTION_ISSUE)
        rows, inputs = [], []
        for i in np.flatnonzero(keep):
            pictures = sample_images(batch, int(i))
            if not pictures:
                continue
            try:                    # a clip: its middle frame (the SVD paper's CoCa caption)
                inputs.append(self._prepare(pictures[len(pictures) // 2]))
                rows.append(int(i))
            except Exception as exc:  # noqa: BLE001 - a picture that cannot be read is a rejected row
                reject(batch, int(i), f"caption_error: {type(exc).__name__}: {exc}")
        step = self.config.batch_size
        for start in range(0, len(rows), step):
            made = self.coca.caption(inputs[start:start + step])
            for i, (text, issue) in zip(rows[start:start + step], made, strict=True):
                if batch[STATUS][i] == KEPT:
                    captions[i], issues[i] = text, issue
        return batch


__all__ = ["CaptionConfig", "CaptionImages"]
