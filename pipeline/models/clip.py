"""CLIP (Radford et al., 2021) through open_clip: resolve weights to local files, load the model,
embed images and texts as L2-normalised float32 rows.

Weights never download unless ``allow_download`` is set: ``resolve_weights`` turns ``pretrained``
(an open_clip tag, a weights file, a local open_clip folder or ``hf-hub:`` id) into files on disk,
and fails naming the key and the path it tried. ``winnow-tiny-clip`` is a ~1M-parameter random
model for tests and the demo.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import numpy as np

from pipeline.contract.config import ConfigError
from pipeline.contract.media import open_image

TINY_MODELS_DIR = os.path.join(os.path.dirname(__file__), "model_configs")
TINY_CLIP = "winnow-tiny-clip"
TINY_COCA = "winnow-tiny-coca"           # a ~3M-parameter random CoCa (pipeline.models.captioner)
TINY_MODELS = (TINY_CLIP, TINY_COCA)     # built from model_configs/ with seeded random weights, no file needed
WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")
FIX = ("put the weights on local disk and give their path, or set allow_download: true on a machine "
       "with network access")


def is_random(pretrained: str | None) -> bool:
    """Whether the model is built with random weights (no tag, file or folder given)."""
    return pretrained is None or pretrained == "random"


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

    if any(m not in open_clip.list_models() for m in TINY_MODELS):
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


def resolve_weights(model: str = TINY_CLIP, pretrained: str | None = None, cache_dir: str | None = None,
                    allow_download: bool = False, key: str = "clip") -> ResolvedWeights:
    """Map ``model`` / ``pretrained`` onto local files, or raise ConfigError saying how to fix it
    (``key`` is the config key the message names)."""
    import open_clip
    from open_clip.pretrained import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    _register_tiny()
    pre = pretrained
    if pre and pre.startswith("hf-hub:"):
        repo = pre[len("hf-hub:"):].strip("/")
        if allow_download:
            return ResolvedWeights(pre)
        cfg_file = _cached(repo, ["open_clip_config.json"], cache_dir)
        weights = _cached(repo, [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME], cache_dir)
        if not cfg_file or not weights:
            where = cache_dir or _default_cache()
            raise ConfigError(f"{key}.pretrained: {pre!r} is not in {where} (looked for open_clip_config.json and "
                              f"{HF_SAFE_WEIGHTS_NAME} / {HF_WEIGHTS_NAME}); set cache_dir to the cache that holds it, "
                              f"or {FIX}")
        folder = os.path.dirname(weights)
        return ResolvedWeights("local-dir:" + folder, embed_dim=_local_dir_config(folder, key)["embed_dim"])
    if pre and os.path.isdir(pre):
        return ResolvedWeights("local-dir:" + pre, embed_dim=_local_dir_config(pre, key)["embed_dim"])

    name = model.replace("/", "-")
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        import difflib
        hint = difflib.get_close_matches(name, open_clip.list_models(), n=3)
        fix = f"did you mean {', '.join(map(repr, hint))}?" if hint else "see open_clip.list_models()"
        raise ConfigError(f"{key}.model: unknown open_clip model {model!r}; {fix}")
    dim = int(model_cfg["embed_dim"])
    if pre is None and name not in TINY_MODELS:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ConfigError(f"{key}.pretrained: required for model {model!r}: an open_clip tag "
                          f"({', '.join(tags[:6]) or 'none known'}), a weights file, a local open_clip folder, "
                          f"'hf-hub:org/repo', or 'random' for random weights (benchmarks only)")
    if is_random(pre):
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
    if allow_download:
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
        found = _cached(repo, names, cache_dir)
        if found:
            return ResolvedWeights(name, checkpoint=found, overrides=overrides, embed_dim=dim)
        tried.append(f"hub cache {cache_dir or _default_cache()} for {repo}")
    if tag_cfg.get("url"):
        path = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(tag_cfg["url"]))
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


class ClipModel:
    """One CLIP model on one device: ``prepare`` turns stored image bytes (or a PIL image) into the
    model's input, ``embed_images`` and ``embed_texts`` return L2-normalised float32 rows.
    ``precision`` auto is fp16 on GPU; on CPU it is always fp32."""

    def __init__(self, model: str = TINY_CLIP, pretrained: str | None = None, seed: int = 0, device: str = "cpu",
                 precision: str = "auto", cache_dir: str | None = None, allow_download: bool = False,
                 key: str = "clip"):
        import torch

        self.name, self.random = model, is_random(pretrained)
        self.resolved = resolve_weights(model, pretrained, cache_dir, allow_download, key)
        self.device = device
        self.model, self.preprocess, self.tokenizer = load_model(self.resolved, seed, device)
        precision = "fp32" if device == "cpu" else ("fp16" if precision == "auto" else precision)
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        self.model.to(self.dtype)
        size = self.model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, tuple) else size)
        self.dim = int(self.resolved.embed_dim or self.model.text_projection.shape[-1])

    def prepare(self, image):
        """Stored bytes or a PIL image -> the model's input tensor. JPEG bytes decode at a reduced
        DCT scale that still covers the model's input (PIL ``draft``), most of the cost otherwise."""
        if isinstance(image, (bytes, bytearray, memoryview)):
            with open_image(bytes(image), draft=(self.image_size, self.image_size)) as img:
                image = img.convert("RGB")
        return self.preprocess(image)

    def embed_images(self, tensors: list) -> np.ndarray:
        import torch

        if not tensors:
            return np.zeros((0, self.dim), np.float32)
        x = torch.stack(tensors).to(self.device, self.dtype)
        with torch.inference_mode():
            f = self.model.encode_image(x).float()
        return torch.nn.functional.normalize(f, dim=-1).cpu().numpy()

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        import torch

        if not texts:
            return np.zeros((0, self.dim), np.float32)
        tokens = self.tokenizer(texts).to(self.device)
        with torch.inference_mode():
            f = self.model.encode_text(tokens).float()
        return torch.nn.functional.normalize(f, dim=-1).cpu().numpy()


__all__ = ["TINY_CLIP", "ClipModel", "ResolvedWeights", "is_random", "load_model", "resolve_weights"]
