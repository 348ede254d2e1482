"""CLIP image and caption embeddings (open_clip) and their cosine, ``clip_similarity``.

One CLIP pass serves several scores: the L2-normalised image embedding travels on in the
batch (``clip_image_embedding``) for the aesthetic head and semantic dedup, and is saved per
shard under ``OUTPUT/embeddings/`` so sweeps never recompute it. Radford et al. (2021) for
CLIP; LAION-5B (Schuhmann et al., 2022) for filtering on the image-caption cosine.

Weights never download unless ``allow_download`` is set: ``resolve_weights`` turns the spec's
``pretrained`` (an open_clip tag, a weights file, a local open_clip folder or ``hf-hub:`` id)
into files on disk before Ray starts, and fails naming the key and the path it tried.
"""
from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from curation.models import ModelRuntime, ModelStage, open_rgb, torch_device
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

TINY_MODELS_DIR = os.path.join(os.path.dirname(__file__), "model_configs")
TINY_CLIP = "winnow-tiny-clip"
WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")
FIX = ("put the weights on local disk and give their path, or set allow_download: true on a machine "
       "with network access")


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
    text: bool = option(True, "embed captions and compute clip_similarity")
    min_similarity: float | None = option(None, "reject samples whose clip_similarity is below this "
                                          "(LAION: 0.28 with ViT-B/32; Taiyi: 0.2)", min=-1, max=1)
    missing_caption: Literal["keep", "reject"] = option(
        "keep", "samples without a caption: keep them (similarity null) or reject them")
    batch_size: int = option(64, "images per model call", min=1, runtime=True)


def is_random(config: ClipConfig) -> bool:
    """Whether the model is built with random weights (no tag, file or folder given)."""
    return config.pretrained is None or config.pretrained == "random"


@dataclass
class ResolvedWeights:
    """What open_clip is called with: never a tag that would need the network."""

    model_name: str                       # built-in name or 'local-dir:PATH'
    checkpoint: str | None = None         # weights file, or None for random weights
    download_tag: str | None = None       # only with allow_download
    overrides: dict = field(default_factory=dict)   # preprocessing and quick_gelu of a resolved tag
    embed_dim: int = 0


def _register_tiny() -> None:
    import open_clip

    if TINY_CLIP not in open_clip.list_models():
        open_clip.add_model_config(TINY_MODELS_DIR)


def _local_dir_config(path: str, key: str) -> dict:
    cfg = os.path.join(path, "open_clip_config.json")
    if not os.path.isfile(cfg):
        raise ConfigError(f"{key}: folder {path!r} has no open_clip_config.json; give a folder saved by open_clip "
                          f"(or a hub snapshot of one), or a weights file")
    with open(cfg, encoding="utf-8") as fh:
        doc = json.load(fh)
    if "model_cfg" not in doc:
        raise ConfigError(f"{key}: {cfg} has no 'model_cfg' section; it is not an open_clip config")
    if not any(f.endswith(WEIGHT_SUFFIXES) for f in os.listdir(path)):
        raise ConfigError(f"{key}: folder {path!r} has no weights file (.safetensors/.bin/.pth); {FIX}")
    return doc["model_cfg"]


def _default_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _cached(repo: str, filenames: list[str], cache_dir: str | None) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    for name in filenames:
        found = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def resolve_weights(config: ClipConfig, key: str = "clip") -> ResolvedWeights:
    """Map the spec's model/pretrained onto local files, or raise ConfigError saying how to fix it."""
    import open_clip
    from open_clip.pretrained import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    _register_tiny()
    pre = config.pretrained
    if pre and pre.startswith("hf-hub:"):
        repo = pre[len("hf-hub:"):].strip("/")
        if config.allow_download:
            return ResolvedWeights(pre)
        cfg_file = _cached(repo, ["open_clip_config.json"], config.cache_dir)
        weights = _cached(repo, [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME], config.cache_dir)
        if not cfg_file or not weights:
            where = config.cache_dir or _default_cache()
            raise ConfigError(f"{key}.pretrained: {pre!r} is not in {where} (looked for open_clip_config.json and "
                              f"{HF_SAFE_WEIGHTS_NAME} / {HF_WEIGHTS_NAME}); set cache_dir to the cache that holds it, "
                              f"or {FIX}")
        folder = os.path.dirname(weights)
        return ResolvedWeights("local-dir:" + folder, embed_dim=_local_dir_config(folder, key)["embed_dim"])
    if pre and os.path.isdir(pre):
        return ResolvedWeights("local-dir:" + pre, embed_dim=_local_dir_config(pre, key)["embed_dim"])

    name = config.model.replace("/", "-")
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        import difflib
        hint = difflib.get_close_matches(name, open_clip.list_models(), n=3)
        raise ConfigError(
            f"{key}.model: unknown open_clip model {config.model!r}"
            + (f"; did you mean {', '.join(map(repr, hint))}?" if hint else "; see open_clip.list_models()")
        )
    dim = int(model_cfg["embed_dim"])
    if pre is None and name != TINY_CLIP:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ConfigError(f"{key}.pretrained: required for model {config.model!r}: an open_clip tag "
                          f"({', '.join(tags[:6]) or 'none known'}), a weights file, a local open_clip folder, "
                          f"'hf-hub:org/repo', or 'random' for random weights (benchmarks only)")
    if pre is None or pre == "random":
        return ResolvedWeights(name, embed_dim=dim)
    if pre.endswith(WEIGHT_SUFFIXES) or os.sep in pre:
        if not os.path.isfile(pre):
            raise ConfigError(f"{key}.pretrained: weights file {pre!r} does not exist; {FIX}")
        return ResolvedWeights(name, checkpoint=pre, embed_dim=dim)
    tag_cfg = open_clip.get_pretrained_cfg(name, pre)
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ConfigError(f"{key}.pretrained: {pre!r} is neither a file nor an open_clip tag of {name}; "
                          f"known tags: {', '.join(tags) or 'none'}")
    if config.allow_download:
        return ResolvedWeights(name, download_tag=pre, embed_dim=dim)
    overrides = {"image_mean": tag_cfg.get("mean"), "image_std": tag_cfg.get("std"),
                 "image_interpolation": tag_cfg.get("interpolation"),
                 "image_resize_mode": tag_cfg.get("resize_mode"),
                 "force_quick_gelu": bool(tag_cfg.get("quick_gelu", False))}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    tried = []
    if tag_cfg.get("hf_hub"):
        repo, filename = os.path.split(tag_cfg["hf_hub"])   # 'org/repo/' or 'org/repo/file.bin'
        names = [filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        found = _cached(repo, names, config.cache_dir)
        if found:
            return ResolvedWeights(name, checkpoint=found, overrides=overrides, embed_dim=dim)
        tried.append(f"hub cache {config.cache_dir or _default_cache()} for {repo}")
    if tag_cfg.get("url"):
        path = os.path.join(config.cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(tag_cfg["url"]))
        if os.path.isfile(path):
            return ResolvedWeights(name, checkpoint=path, overrides=overrides, embed_dim=dim)
        tried.append(path)
    raise ConfigError(f"{key}.pretrained: tag {pre!r} of {name} is not cached (looked in {'; '.join(tried)}); {FIX}")


def load_model(resolved: ResolvedWeights, seed: int = 0, device: str = "cpu"):
    """Build the open_clip model, preprocessing and tokenizer; random weights are seeded."""
    import open_clip
    import torch

    _register_tiny()
    root = logging.getLogger()
    level = root.level
    if not (resolved.checkpoint or resolved.download_tag):
        root.setLevel(logging.ERROR)   # open_clip warns that random weights are random; we asked for them
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, _, preprocess = open_clip.create_model_and_transforms(
                resolved.model_name, pretrained=resolved.checkpoint or resolved.download_tag, device=device,
                **resolved.overrides)
    finally:
        root.setLevel(level)
    model.eval()
    tokenizer = open_clip.get_tokenizer(resolved.model_name)
    return model, preprocess, tokenizer


class ClipEmbed(ModelStage):
    """Adds ``clip_image_embedding``, ``clip_text_embedding`` and ``clip_similarity``."""

    name = "clip"
    Config = ClipConfig

    @classmethod
    def validate(cls, config: ClipConfig, key: str, earlier: list[tuple[str, Any]]) -> None:
        super().validate(config, key, earlier)
        resolve_weights(config, key)
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
        import torch

        super().__init__(config)
        cfg = self.config
        self.resolved = resolve_weights(cfg, "clip")
        self.device = torch_device(cfg)
        self.model, self.preprocess, self.tokenizer = load_model(self.resolved, cfg.seed, self.device)
        # fp32 on CPU whatever was asked (device auto may land there); auto = fp16 on GPU
        precision = "fp32" if self.device == "cpu" else ("fp16" if cfg.precision == "auto" else cfg.precision)
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        self.model.to(self.dtype)
        self.image_size = int(self.model.visual.image_size[0] if isinstance(self.model.visual.image_size, tuple)
                              else self.model.visual.image_size)
        self.dim = int(self.resolved.embed_dim or self.model.text_projection.shape[-1])
        self.pool = ThreadPoolExecutor(max_workers=max(1, round(cfg.cpus_per_worker)))

    def _try_prepare(self, data: bytes):
        try:
            return self._prepare(data)
        except Exception as exc:  # noqa: BLE001 - a sample that cannot be read is a rejected row
            return exc

    def _prepare(self, data: bytes):
        """Stored bytes -> the model's input tensor; runs on the actor's CPU threads."""
        return self.preprocess(open_rgb(data, self.image_size))

    def embed_images(self, tensors: list) -> np.ndarray:
        import torch

        x = torch.stack(tensors).to(self.device, self.dtype)
        with torch.inference_mode():
            f = self.model.encode_image(x).float()
        return torch.nn.functional.normalize(f, dim=-1).cpu().numpy()

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        import torch

        tokens = self.tokenizer(texts).to(self.device)
        with torch.inference_mode():
            f = self.model.encode_text(tokens).float()
        return torch.nn.functional.normalize(f, dim=-1).cpu().numpy()

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
            emb = self.embed_images([prepared[j] for j in good])
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
        if not self.config.text:
            return batch
        text_emb = np.full((n, self.dim), np.nan, dtype=np.float32)
        captions = batch[CAPTION] if CAPTION in batch else [None] * n
        with_text = [i for i in rows if isinstance(captions[i], str) and captions[i].strip()]
        if with_text:
            text_emb[with_text] = self.embed_texts([captions[i] for i in with_text])
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


__all__ = ["TINY_CLIP", "ClipConfig", "ClipEmbed", "embedding_dim", "load_model", "resolve_weights"]
