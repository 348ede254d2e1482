"""CLIP image and caption embeddings and their cosine, ``clip_similarity``: a stage on
``pipeline.models.clip``.

One CLIP pass serves several scores: the L2-normalised image embedding travels on in the
batch (``clip_image_embedding``) for the aesthetic head and semantic dedup, and is saved per
shard under ``OUTPUT/embeddings/`` so sweeps never recompute it. Radford et al. (2021) for
CLIP; LAION-5B (Schuhmann et al., 2022) for filtering on the image-caption cosine.

Weights never download unless ``allow_download`` is set: they are resolved to files on disk before
Ray starts, and a missing one fails naming the key and the path it tried.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from curation.models import ModelRuntime, ModelStage, torch_device
from pipeline.contract.config import ConfigError, option
from pipeline.contract.schema import (
    CAPTION,
    CLIP_FRAMES,
    CLIP_SIMILARITY,
    FRAME_EMBEDDINGS,
    IMAGE_EMBEDDING,
    KEPT,
    STATUS,
    TEXT_EMBEDDING,
)
from pipeline.contract.stage import active, batch_len, column, is_clip_batch, reject, sample_images
from pipeline.models import clip as clip_models
from pipeline.models.clip import TINY_CLIP


@dataclass
class ClipConfig(ModelRuntime):
    model: str = option(TINY_CLIP, f"open_clip model name (ViT-L-14, ViT-B-32, ...); {TINY_CLIP!r} is a "
                        "~1M-parameter random model for tests and the demo")
    pretrained: str | None = option(None, "open_clip tag (laion2b_s32b_b82k), a weights file (.bin/.pt/.safetensors), "
                                    "a folder with open_clip_config.json, 'hf-hub:org/repo', or 'random'")
    cache_dir: str | None = option(None, "Hugging Face hub cache to look in for tags and hf-hub ids "
                                   "(default: HF_HUB_CACHE, ~/.cache/huggingface/hub)")
    allow_download: bool = option(False, "let open_clip download missing weights (needs network)")
    seed: int = option(0, "seed of random weights ('random' or the tiny model)")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = option(
        "auto", "auto = fp16 on GPU, fp32 on CPU", runtime=True)
    text: bool | str = option(True, "embed captions and compute clip_similarity: true (the source caption), false "
                              "(images only), or a caption column an earlier caption stage writes (caption_coca, "
                              "caption_vlm, caption_summary)")
    min_similarity: float | None = option(None, "reject samples whose clip_similarity is below this "
                                          "(LAION: 0.28 with ViT-B/32; Taiyi: 0.2)", min=-1, max=1)
    missing_caption: Literal["keep", "reject"] = option(
        "keep", "samples without a caption: keep them (similarity null) or reject them")
    batch_size: int = option(64, "images per model call", min=1, runtime=True)


def is_random(config: ClipConfig) -> bool:
    """Whether the model is built with random weights (no tag, file or folder given)."""
    return clip_models.is_random(config.pretrained)


def text_column(config: ClipConfig) -> str | None:
    """The column whose text is embedded: ``caption`` for true, None for false, else the name given."""
    if isinstance(config.text, bool):
        return CAPTION if config.text else None
    return config.text


def resolve_weights(config: ClipConfig, key: str = "clip") -> clip_models.ResolvedWeights:
    """The stage's weights as local files (``pipeline.models.clip.resolve_weights``), or a ConfigError."""
    return clip_models.resolve_weights(config.model, config.pretrained, config.cache_dir, config.allow_download, key)


class ClipEmbed(ModelStage):
    """Adds ``clip_image_embedding``, ``clip_text_embedding`` and ``clip_similarity``."""

    name = "clip"
    Config = ClipConfig

    @classmethod
    def validate(cls, config: ClipConfig, key: str, earlier: list[tuple[str, Any]]) -> None:
        super().validate(config, key, earlier)
        resolve_weights(config, key)
        column = text_column(config)
        if column and column != CAPTION:
            made = {f"caption_{b}" for name, cfg in earlier if name == "caption" for b in cfg.backends}
            if column not in made:
                raise ConfigError(f"{key}.text: {column!r} is written by no earlier caption stage"
                                  f"{' (they write ' + ', '.join(sorted(made)) + ')' if made else ''}; put a caption "
                                  f"stage whose backends make it before this stage, or give true for the source "
                                  f"caption")
        if config.precision in ("fp16", "bf16") and config.device == "cpu":
            raise ConfigError(
                f"{key}.precision: {config.precision} runs on GPU only here; use fp32 or auto with device cpu"
            )

    @classmethod
    def notices(cls, config: ClipConfig, earlier: list[tuple[str, Any]]) -> list[str]:
        if not is_random(config):
            return []
        filt = (f"; min_similarity {config.min_similarity:g} rejects at random"
                if config.min_similarity is not None else "")
        return [f"clip: {config.model} runs on random weights (pretrained: {config.pretrained or 'none'}), so "
                f"clip_similarity means nothing{filt}; give real weights in clip.pretrained"]

    def __init__(self, config: ClipConfig | None = None):
        config = config or ClipConfig()
        if not config.allow_download:
            # belt and braces: weights are already resolved to files, and nothing else (a tokenizer
            # config, say) may reach the hub either; set before huggingface_hub is first imported
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        super().__init__(config)
        cfg = self.config
        self.clip = clip_models.ClipModel(cfg.model, cfg.pretrained, cfg.seed, torch_device(cfg), cfg.precision,
                                          cfg.cache_dir, cfg.allow_download)
        self.dim = self.clip.dim
        self.pool = ThreadPoolExecutor(max_workers=max(1, round(cfg.cpus_per_worker)))

    def _try_prepare(self, data: bytes):
        try:
            return self.clip.prepare(data)
        except Exception as exc:  # noqa: BLE001 - a sample that cannot be read is a rejected row
            return exc

    def __call__(self, batch):
        n = batch_len(batch)
        keep = active(batch)
        clips = is_clip_batch(batch)
        image_emb = np.full((n, self.dim), np.nan, dtype=np.float32)
        frame_emb = np.full((n, CLIP_FRAMES * self.dim), np.nan, dtype=np.float32) if clips else None
        sims = column(batch, CLIP_SIMILARITY)
        owners, pictures = [], []     # a clip row has several frames; an image row one picture
        for i in np.flatnonzero(keep):
            for data in sample_images(batch, int(i)):
                owners.append(int(i))
                pictures.append(data)
        # decode + resize in threads (PIL releases the GIL): a GPU actor is otherwise fed by one core
        prepared = list(self.pool.map(self._try_prepare, pictures))
        for i, got in zip(owners, prepared, strict=True):
            if isinstance(got, Exception):
                reject(batch, i, f"clip_error: {type(got).__name__}: {got}")
        good = [j for j, i in enumerate(owners) if batch[STATUS][i] == KEPT]
        per_row: dict[int, list[np.ndarray]] = {}
        if good:
            emb = self.clip.embed_images([prepared[j] for j in good])
            for j, e in zip(good, emb, strict=True):
                per_row.setdefault(owners[j], []).append(e)
        rows = sorted(per_row)
        for i in rows:
            mean = np.mean(per_row[i], axis=0)
            image_emb[i] = mean / max(float(np.linalg.norm(mean)), 1e-12)
            if clips:
                frames = (per_row[i] + [per_row[i][-1]] * CLIP_FRAMES)[:CLIP_FRAMES]
                frame_emb[i] = np.concatenate(frames)
        batch[IMAGE_EMBEDDING] = image_emb
        if clips:
            batch[FRAME_EMBEDDINGS] = frame_emb
        text_col = text_column(self.config)
        if text_col is None:
            return batch
        text_emb = np.full((n, self.dim), np.nan, dtype=np.float32)
        captions = batch[text_col] if text_col in batch else [None] * n
        with_text = [i for i in rows if isinstance(captions[i], str) and captions[i].strip()]
        if with_text:
            text_emb[with_text] = self.clip.embed_texts([captions[i] for i in with_text])
            for i in with_text:   # a clip's similarity is the mean over its frames (SVD's LVD)
                sim = float(np.mean([e @ text_emb[i] for e in per_row[i]]))
                sims[i] = float(np.clip(sim, -1.0, 1.0))
        batch[TEXT_EMBEDDING] = text_emb
        floor = self.config.min_similarity
        for i in rows:
            if sims[i] is None:
                if self.config.missing_caption == "reject":
                    reject(batch, i, "clip_similarity: no caption")
            elif floor is not None and sims[i] < floor:
                reject(batch, i, f"clip_similarity: {sims[i]:.3f} < {floor}")
        return batch


def embedding_dim(stages: list[tuple[str, Any]]) -> int | None:
    """Embedding size of the last clip stage among ``stages`` (for heads that read it)."""
    for name, cfg in reversed(stages):
        if name == ClipEmbed.name:
            return resolve_weights(cfg).embed_dim or None   # 0: only known after a download
    return None


__all__ = ["TINY_CLIP", "ClipConfig", "ClipEmbed", "embedding_dim", "is_random", "resolve_weights", "text_column"]
