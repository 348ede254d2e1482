"""Open preference (reward) models that score an image against its prompt, to stand in for people
in ``winnow prefer --judge``:

- ``imagereward``: ImageReward (Xu et al., 2023, "ImageReward: Learning and Evaluating Human
  Preferences for Text-to-Image Generation"): BLIP's ViT and its BERT text encoder with
  cross-attention to the image (Li et al., 2022), and an MLP on the [CLS] state. Built here from
  timm's ViT and transformers' ``BlipTextModel`` and loaded from the released ``ImageReward.pt``
  state dict (the ``image-reward`` package pins timm 0.6, which winnow's stack cannot take).
- ``pickscore``: PickScore (Kirstain et al., 2023, "Pick-a-Pic"): a CLIP ViT-H/14 fine-tuned on
  people's picks, in transformers' ``CLIPModel`` format; the score is the logit scale times the
  cosine of image and prompt.
- ``hpsv2``: HPSv2 (Wu et al., 2023, "Human Preference Score v2"): an open_clip ViT-H/14 fine-tuned
  on HPD v2; the score is the cosine of image and prompt.

Weights resolve offline only: a file or folder, or a hub id already in the Hugging Face cache. A
judge whose weights are missing raises ``ConfigError`` naming the files it looked for and the
command that fetches them on a machine with network. Nothing is unpickled: ``.pt`` files are read
with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from pipeline.contract.config import ConfigError

JUDGES = ("clip", "imagereward", "pickscore", "hpsv2")
# name -> (hub repo, the files the judge needs from it, what to download)
HUB = {
    "imagereward": ("THUDM/ImageReward", ["ImageReward.pt"], "ImageReward.pt med_config.json"),
    "pickscore": ("yuvalkirstain/PickScore_v1", ["config.json"], ""),
    "hpsv2": ("xswu/HPSv2", ["HPS_v2.1_compressed.pt", "HPS_v2_compressed.pt"], "HPS_v2.1_compressed.pt"),
}
# the tokenizer / processor each judge was trained with, when its weights' folder lacks one
PROCESSOR = {"imagereward": "google-bert/bert-base-uncased", "pickscore": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"}
HPS_MODEL = "ViT-H-14"
# ImageReward's reward is standardised with the mean and sd of its training set's rewards (as released)
IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.0333394966054072
IMAGEREWARD_MAX_TOKENS = 35
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WEIGHT_FILES = (".pt", ".pth", ".bin", ".safetensors")
HEAD_DIM = 64        # BLIP's ViTs and BERT use 64-wide attention heads; the weights do not record heads


@dataclasses.dataclass
class JudgeSpec:
    name: str
    weights: str | None = None      # file, folder or hub id; default: HUB[name]
    processor: str | None = None    # tokenizer / processor folder or hub id; default: next to the weights
    model: str | None = None        # clip / hpsv2: the open_clip architecture
    seed: int = 0
    cache_dir: str | None = None


def _fetch(repo: str, files: str) -> str:
    return f"`hf download {repo}{' ' + files if files else ''}`"


def hub_file(repo: str, names: list[str], key: str, fetch: str, cache_dir: str | None = None) -> str:
    """The first of ``names`` from ``repo`` in the local Hugging Face cache, or ConfigError."""
    from huggingface_hub import try_to_load_from_cache

    for name in names:
        found = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    raise ConfigError(f"{key}: {repo} is not in the Hugging Face cache {cache_dir or _cache()} (looked for "
                      f"{' / '.join(names)}); on a machine with network run {fetch} and copy the cache here, "
                      f"or give {key} the downloaded file or folder")


def hub_folder(ref: str, need: str, key: str, cache_dir: str | None = None) -> str:
    """A local folder for ``ref`` (a folder, or a hub id in the cache) holding the file ``need``."""
    if os.path.isdir(ref):
        if not os.path.isfile(os.path.join(ref, need)):
            raise ConfigError(f"{key}: folder {ref!r} has no {need}; give the model's whole folder")
        return ref
    if os.sep in ref and not _is_repo_id(ref) or os.path.exists(ref):
        raise ConfigError(f"{key}: {ref!r} is not a folder; give the model's folder or a hub id in the local cache")
    return os.path.dirname(hub_file(ref, [need], key, _fetch(ref, ""), cache_dir))


def _is_repo_id(ref: str) -> bool:
    parts = ref.split("/")
    return len(parts) == 2 and all(p and not p.startswith(".") for p in parts)


def _cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def resolve(spec: JudgeSpec, key: str = "--judge-weights") -> dict:
    """The local files a judge loads (raises ConfigError naming the fix): checked before any model
    is built, so a bad command fails at once."""
    if spec.name not in JUDGES:
        raise ConfigError(f"--judge: {spec.name!r} is not a judge; one of {', '.join(JUDGES)}")
    if spec.name == "clip":
        from pipeline.models.clip import TINY_CLIP, resolve_weights

        resolve_weights(spec.model or TINY_CLIP, spec.weights, spec.cache_dir, key="--clip")
        return {}
    repo, names, fetch = HUB[spec.name]
    if spec.name == "pickscore":
        model = hub_folder(spec.weights or repo, "config.json", key, spec.cache_dir)
        proc = spec.processor or (model if os.path.isfile(os.path.join(model, "tokenizer_config.json"))
                                  else PROCESSOR["pickscore"])
        return {"model": model, "processor": hub_folder(proc, "tokenizer_config.json", "--judge-processor",
                                                        spec.cache_dir)}
    if spec.weights and os.path.isdir(spec.weights):
        found = [os.path.join(spec.weights, n) for n in names if os.path.isfile(os.path.join(spec.weights, n))]
        if not found:
            raise ConfigError(f"{key}: folder {spec.weights!r} has none of {', '.join(names)}")
        weights = found[0]
    elif spec.weights and (os.path.isfile(spec.weights) or not _is_repo_id(spec.weights)
                           or spec.weights.endswith(WEIGHT_FILES)):
        if not os.path.isfile(spec.weights):
            raise ConfigError(f"{key}: weights file {spec.weights!r} does not exist; on a machine with network run "
                              f"{_fetch(repo, fetch)} and give the file's path")
        weights = spec.weights
    else:
        weights = hub_file(spec.weights or repo, names, key, _fetch(spec.weights or repo, fetch), spec.cache_dir)
    if spec.name == "hpsv2":
        from pipeline.models.clip import resolve_weights

        resolve_weights(spec.model or HPS_MODEL, weights, key="--judge-model")
        return {"weights": weights}
    med = os.path.join(os.path.dirname(weights), "med_config.json")
    tok = spec.processor or (os.path.dirname(weights) if os.path.isfile(os.path.join(os.path.dirname(weights),
                                                                                     "vocab.txt"))
                             else PROCESSOR["imagereward"])
    return {"weights": weights, "med_config": med if os.path.isfile(med) else None,
            "tokenizer": hub_folder(tok, "vocab.txt", "--judge-processor", spec.cache_dir)}


class Judge:
    """Scores images against a prompt (higher is preferred); ``random`` says the weights are random."""

    name = ""
    label = ""
    random = False

    def scores(self, images: list, prompt: str) -> np.ndarray:
        raise NotImplementedError


class ClipJudge(Judge):
    """The CLIP cosine of image and prompt (open_clip; ``hpsv2`` is this with HPSv2's weights)."""

    def __init__(self, name: str, model: str | None, pretrained: str | None, seed: int = 0):
        from pipeline.models.clip import TINY_CLIP, ClipModel, is_random

        self.name = name
        self.clip = ClipModel(model or TINY_CLIP, pretrained, seed)
        self.random = is_random(pretrained)
        self.label = (model or TINY_CLIP) + (" (random weights)" if self.random else "")

    def scores(self, images, prompt):
        text = self.clip.embed_texts([prompt])[0]
        out = [self.clip.embed_images([self.clip.prepare(im) for im in images[i:i + 32]]) @ text
               for i in range(0, len(images), 32)]
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


class PickScoreJudge(Judge):
    """PickScore: ``logit_scale.exp() * cos(image, prompt)`` with a transformers CLIPModel."""

    name = "pickscore"

    def __init__(self, model: str, processor: str):
        import torch
        from transformers import AutoProcessor, CLIPModel

        self.label = model
        self.processor = AutoProcessor.from_pretrained(processor, local_files_only=True)
        self.model = CLIPModel.from_pretrained(model, local_files_only=True).eval()
        self.torch = torch

    def scores(self, images, prompt):
        torch = self.torch
        x = self.processor(images=list(images), text=[prompt], padding=True, truncation=True, max_length=77,
                           return_tensors="pt")
        with torch.no_grad():
            im = _pooled(self.model.get_image_features(pixel_values=x["pixel_values"]))
            tx = _pooled(self.model.get_text_features(input_ids=x["input_ids"], attention_mask=x["attention_mask"]))
            im, tx = (torch.nn.functional.normalize(e.float(), dim=-1) for e in (im, tx))
            return (self.model.logit_scale.exp() * im @ tx[0]).numpy().astype(np.float64)


def _pooled(out):
    """transformers 5 returns the projected features as ``pooler_output``; 4.x returned the tensor."""
    return out.pooler_output if hasattr(out, "pooler_output") else out


def _blip_vit(state: dict, prefix: str):
    """timm's ViT shaped like the checkpoint's BLIP ViT (same keys, same forward: class token,
    absolute positions, pre-norm blocks, a final norm, LayerNorm eps 1e-6, exact GELU)."""
    from timm.models.vision_transformer import VisionTransformer

    w = state[prefix + "patch_embed.proj.weight"]
    width, patch = int(w.shape[0]), int(w.shape[-1])
    tokens = int(state[prefix + "pos_embed"].shape[1]) - 1
    side = int(round(tokens ** 0.5))
    if side * side != tokens or width % HEAD_DIM and width >= HEAD_DIM:
        raise ConfigError(f"--judge-weights: {prefix}pos_embed has {tokens} patches, not a square ViT's")
    depth = len({k[len(prefix):].split(".")[1] for k in state if k.startswith(prefix + "blocks.")})
    mlp = int(state[prefix + "blocks.0.mlp.fc1.weight"].shape[0])
    return VisionTransformer(img_size=side * patch, patch_size=patch, embed_dim=width, depth=depth,
                             num_heads=max(1, width // HEAD_DIM), mlp_ratio=mlp / width, qkv_bias=True,
                             num_classes=0, global_pool=""), side * patch


def _med_text(state: dict, prefix: str, med: dict, vision_width: int):
    """transformers' BlipTextModel (BLIP's med.py BERT, ported) shaped like the checkpoint; with
    ``is_decoder`` set it builds the cross-attention, and is called bidirectionally."""
    from transformers import BlipTextConfig, BlipTextModel

    words, hidden = state[prefix + "embeddings.word_embeddings.weight"].shape
    layers = len({k[len(prefix):].split(".")[2] for k in state if k.startswith(prefix + "encoder.layer.")})
    cfg = BlipTextConfig(
        vocab_size=int(words), hidden_size=int(hidden), encoder_hidden_size=vision_width,
        intermediate_size=int(state[prefix + "encoder.layer.0.intermediate.dense.weight"].shape[0]),
        num_attention_heads=int(med.get("num_attention_heads", max(1, hidden // HEAD_DIM))),
        num_hidden_layers=layers, layer_norm_eps=float(med.get("layer_norm_eps", 1e-12)),
        max_position_embeddings=int(state[prefix + "embeddings.position_embeddings.weight"].shape[0]),
        hidden_act=med.get("hidden_act", "gelu"), pad_token_id=int(med.get("pad_token_id", 0)),
        bos_token_id=None, eos_token_id=None, sep_token_id=None, is_decoder=True)
    return BlipTextModel(cfg, add_pooling_layer=False)


def build_imagereward(state: dict, med: dict | None = None):
    """The ImageReward network for a state dict in its released layout (``blip.visual_encoder.*``,
    ``blip.text_encoder.*``, ``mlp.layers.*``): sizes read from the tensors' shapes."""
    import torch

    vit, size = _blip_vit(state, "blip.visual_encoder.")
    text = _med_text(state, "blip.text_encoder.", med or {}, vit.embed_dim)
    hidden = text.config.hidden_size
    widths = [hidden] + [int(state[f"mlp.layers.{i}.weight"].shape[0]) for i in (0, 2, 4, 6, 7)]
    mods = []
    for i, (a, b) in enumerate(zip(widths, widths[1:], strict=False)):
        mods.append(torch.nn.Linear(a, b))
        if i < 3:
            mods.append(torch.nn.Dropout(0.0))   # the released head: Linear/Dropout x3, Linear, Linear
    net = torch.nn.Module()
    net.blip = torch.nn.Module()
    net.blip.visual_encoder, net.blip.text_encoder = vit, text
    net.mlp = torch.nn.Module()
    net.mlp.layers = torch.nn.Sequential(*mods)
    return net, size


class ImageRewardJudge(Judge):
    """ImageReward's standardised reward of an image for a prompt."""

    name = "imagereward"

    def __init__(self, weights: str, tokenizer: str, med_config: str | None = None):
        import torch
        from torchvision import transforms as T
        from transformers import BertTokenizer

        self.label, self.torch = weights, torch
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:   # noqa: BLE001 - any unreadable file is the user's to fix
            raise ConfigError(f"--judge-weights: {weights!r} is not a readable ImageReward state dict ({e})") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        if not isinstance(state, dict) or "blip.visual_encoder.patch_embed.proj.weight" not in state:
            raise ConfigError(f"--judge-weights: {weights!r} is not ImageReward's state dict "
                              f"(no blip.visual_encoder.* / blip.text_encoder.* / mlp.layers.*)")
        med = {}
        if med_config:
            with open(med_config, encoding="utf-8") as fh:
                med = json.load(fh)
        try:
            self.net, size = build_imagereward(state, med)
        except KeyError as e:
            raise ConfigError(f"--judge-weights: {weights!r} lacks ImageReward's tensor {e.args[0]}") from None
        own = self.net.state_dict()
        missing = [k for k in own if k not in state]
        if missing:
            raise ConfigError(f"--judge-weights: {weights!r} lacks {len(missing)} of ImageReward's tensors "
                              f"(first: {missing[0]})")
        self.net.load_state_dict({k: state[k] for k in own})
        self.net.float().eval()
        self.tokenizer = BertTokenizer.from_pretrained(tokenizer, local_files_only=True)
        # BLIP adds these two after BERT's vocabulary (blip.init_tokenizer); the ids of a prompt's
        # words are BERT's either way, the count must match the embedding table
        self.tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
        words = self.net.blip.text_encoder.config.vocab_size
        if len(self.tokenizer) > words:
            raise ConfigError(f"--judge-processor: the tokenizer has {len(self.tokenizer)} ids, the weights "
                              f"{words}; give BERT's uncased tokenizer ({PROCESSOR['imagereward']})")
        self.preprocess = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                                     T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])

    def scores(self, images, prompt):
        torch = self.torch
        text = self.tokenizer(prompt, padding="max_length", truncation=True, max_length=IMAGEREWARD_MAX_TOKENS,
                              return_tensors="pt")
        out = []
        with torch.no_grad():
            for i in range(0, len(images), 16):
                x = torch.stack([self.preprocess(im.convert("RGB")) for im in images[i:i + 16]])
                emb = self.net.blip.visual_encoder.forward_features(x)
                n = len(x)
                hidden = self.net.blip.text_encoder(
                    input_ids=text["input_ids"].expand(n, -1), attention_mask=text["attention_mask"].expand(n, -1),
                    encoder_hidden_states=emb, encoder_attention_mask=torch.ones(emb.shape[:-1], dtype=torch.long),
                ).last_hidden_state[:, 0, :]
                out.append(((self.net.mlp.layers(hidden.float())[:, 0] - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).numpy())
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


def load(spec: JudgeSpec) -> Judge:
    files = resolve(spec)
    if spec.name == "clip":
        return ClipJudge("clip", spec.model, spec.weights, spec.seed)
    if spec.name == "hpsv2":
        return ClipJudge("hpsv2", spec.model or HPS_MODEL, files["weights"], spec.seed)
    if spec.name == "pickscore":
        return PickScoreJudge(files["model"], files["processor"])
    return ImageRewardJudge(files["weights"], files["tokenizer"], files["med_config"])


__all__ = ["JUDGES", "Judge", "JudgeSpec", "build_imagereward", "load", "resolve"]
