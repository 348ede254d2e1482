"""Captions generated from pixels. ``CocaCaptioner``: open_clip's CoCa (Yu et al., 2022, "CoCa:
Contrastive Captioners are Image-Text Foundation Models"), the captioner the SVD paper ran on each
clip's middle frame (``coca_ViT-L-14`` with the ``mscoco_finetuned_laion2b_s13b_b90k`` tag).

Decoding is greedy and written here (open_clip's ``generate`` samples or beam-searches in a
loop over the batch): the image is encoded once, then one token per step for every row still
open, so a caption depends on its image alone, not on the batch it came in or the run. Weights
resolve offline as CLIP's do (``pipeline.models.clip.resolve_weights``); ``winnow-tiny-coca`` is a
seeded random model for tests, the demo and dry runs, and says so.
"""
from __future__ import annotations

import unicodedata

from pipeline.models.clip import TINY_COCA, is_random, load_model, resolve_weights

SOT, EOT = 49406, 49407          # CLIP's BPE start and end of text
MAX_TOKENS = 75                  # CoCa's text context (76) less the start token
REPEAT = 6                       # the same token this many times in a row: a degenerate caption


def clean_text(text: str, limit: int = 1000) -> str:
    """Printable UTF-8: control characters (C0, C1, format marks such as RLO) removed, whitespace
    runs collapsed, at most ``limit`` characters."""
    text = "".join(" " if unicodedata.category(c).startswith(("Z", "C")) and c.isspace() else c for c in text)
    text = "".join(c for c in text if not unicodedata.category(c).startswith("C"))
    return " ".join(text.split())[:limit]


MAX_ASPECT = 4.0                 # a wider (or taller) picture is centre-cropped to this before a captioner
MAX_SIDE = 1024                  # and shrunk to this longest side: a processor never resizes a panorama whole


def fit_picture(image):
    """An RGB copy a captioner's own preprocessing handles in bounded memory: centre-cropped to an
    aspect ratio of at most ``MAX_ASPECT`` and at most ``MAX_SIDE`` pixels on its longest side (a
    30,000 x 2 panorama would otherwise be resized to millions of pixels wide to cover 224 tall)."""
    im = image.convert("RGB")
    w, h = im.size
    if w > MAX_ASPECT * h:
        keep = max(1, round(MAX_ASPECT * h))
        im = im.crop(((w - keep) // 2, 0, (w - keep) // 2 + keep, h))
    elif h > MAX_ASPECT * w:
        keep = max(1, round(MAX_ASPECT * w))
        im = im.crop((0, (h - keep) // 2, w, (h - keep) // 2 + keep))
    if max(im.size) > MAX_SIDE:
        im.thumbnail((MAX_SIDE, MAX_SIDE))
    return im


def caption_issue(text: str, tokens: list[int], ended: bool) -> str | None:
    """Why a generated caption may be poor: ``empty`` (no text), ``degenerate`` (one token repeated
    ``REPEAT`` times), ``max_new_tokens`` (cut at the cap before the end token), else None."""
    return "empty" if not text else "degenerate" if _degenerate(tokens) else None if ended else "max_new_tokens"


def _degenerate(tokens: list[int]) -> bool:
    run = 1
    for a, b in zip(tokens, tokens[1:], strict=False):
        run = run + 1 if a == b else 1
        if run >= REPEAT:
            return True
    return False


class CocaCaptioner:
    """One CoCa model on one device. ``caption(images)`` -> [(caption, issue or None)] per image:
    ``issue`` is ``empty`` (no text before the end token), ``max_new_tokens`` (cut at the cap) or
    ``degenerate`` (one token repeated); the caption is kept as it came (cleaned) either way."""

    def __init__(self, model: str = TINY_COCA, pretrained: str | None = None, seed: int = 0, device: str = "cpu",
                 max_new_tokens: int = 30, cache_dir: str | None = None, allow_download: bool = False,
                 key: str = "caption"):
        import torch

        if not 1 <= max_new_tokens <= MAX_TOKENS:
            raise ValueError(f"max_new_tokens must be in 1..{MAX_TOKENS} (CoCa's text context)")
        self.name, self.random = model, is_random(pretrained)
        self.resolved = resolve_weights(model, pretrained, cache_dir, allow_download, key)
        self.model, self.preprocess, tokenizer = load_model(self.resolved, seed, device)
        if not hasattr(self.model, "text_decoder"):
            raise ValueError(f"{key}: {model!r} is a CLIP model, not a CoCa captioner; give a coca_* model")
        if not (self.resolved.checkpoint or self.resolved.download_tag):
            # open_clip leaves the decoder's output projection at zero (every logit 0, one token
            # forever): random weights get a seeded one, so a random captioner writes varied text
            proj = self.model.text_decoder.text_projection
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + 1)
                proj.copy_(torch.randn(proj.shape) * proj.shape[0] ** -0.5)
        self.device, self.max_new_tokens = device, max_new_tokens
        self.dtype = torch.float32
        self._decode = tokenizer.decode if hasattr(tokenizer, "decode") else None

    def prepare(self, image):
        """A PIL image -> the model's input tensor."""
        return self.preprocess(fit_picture(image))

    def caption(self, tensors: list) -> list[tuple[str, str | None]]:
        import torch

        if not tensors:
            return []
        x = torch.stack(tensors).to(self.device, self.dtype)
        n = len(tensors)
        with torch.inference_mode():
            latent, embs = self.model._encode_image(x)
            tokens = torch.full((n, 1), SOT, dtype=torch.long, device=self.device)
            done = torch.zeros(n, dtype=torch.bool, device=self.device)
            for _ in range(self.max_new_tokens):
                logits = self.model(x, tokens, image_latent=latent, image_embs=embs, output_labels=False)["logits"]
                step = logits[:, -1].float()
                step[:, SOT] = -float("inf")                      # never restart the text
                nxt = torch.where(done, torch.full_like(done, EOT, dtype=torch.long), step.argmax(-1))
                tokens = torch.cat([tokens, nxt[:, None]], dim=1)
                done |= nxt == EOT
                if bool(done.all()):
                    break
        out = []
        for row in tokens[:, 1:].tolist():
            ended = EOT in row
            ids = row[:row.index(EOT)] if ended else row
            text = clean_text(self._text(ids))
            out.append((text, caption_issue(text, ids, ended)))
        return out

    def _text(self, ids: list[int]) -> str:
        from open_clip.tokenizer import _tokenizer

        return _tokenizer.decode(ids).replace("<start_of_text>", "").replace("<end_of_text>", "").strip()


__all__ = ["CocaCaptioner", "caption_issue", "clean_text", "fit_picture"]
