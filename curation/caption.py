"""Synthetic captions, as the SVD paper captioned LVD: ``caption_coca`` (open_clip's CoCa on an image,
or on a clip's middle frame), ``caption_vlm`` (a vision-language model on the image, or on ``frames``
frames spread over the clip) and ``caption_summary`` (a language model merging the others and the
source text through a prompt template); ``pipeline.models.captioner`` and ``pipeline.models.textgen``
run them. Backends run in that order, so a summary sees this row's other captions.

The source caption is kept as ``caption``. A caption a model makes poorly is still written, with
``caption_issue`` naming the backend and why (``coca:empty``, ``vlm:max_new_tokens``,
``summary:degenerate``); a picture that cannot be read is a rejected row. Decoding is greedy (or beam
search): a caption depends on its input alone, not on the batch, the worker or the run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from curation.models import ModelRuntime, ModelStage, torch_device
from pipeline.contract.config import ConfigError, option
from pipeline.contract.media import open_image
from pipeline.contract.schema import CAPTION, CAPTION_ISSUE, KEPT, KEY, STATUS
from pipeline.contract.stage import active, column, reject, sample_images
from pipeline.models import clip as clip_models
from pipeline.models.captioner import MAX_TOKENS, CocaCaptioner
from pipeline.models.clip import TINY_COCA
from pipeline.models.textgen import (
    TINY_SUMMARY,
    TINY_VLM,
    Summarizer,
    VlmCaptioner,
    default_template,
    resolve_hf,
    row_seed,
    template_fields,
)

BACKENDS = ("coca", "vlm", "summary")


@dataclass
class CaptionConfig(ModelRuntime):
    backends: list[Literal["coca", "vlm", "summary"]] = option(
        help="captioners to run, any of them in this order: coca (open_clip's CoCa on the picture; on a clip its "
             "middle frame), vlm (a vision-language model on the picture or several frames), summary (a language "
             "model merging the others and the source text)",
        factory=lambda: ["coca"])
    coca_model: str = option(TINY_COCA, f"open_clip CoCa model (coca_ViT-L-14, coca_ViT-B-32); {TINY_COCA!r} is a "
                             "~3M-parameter random model for tests and the demo")
    coca_pretrained: str | None = option(None, "open_clip tag (mscoco_finetuned_laion2b_s13b_b90k), a weights file, "
                                         "a folder with open_clip_config.json, 'hf-hub:org/repo', or 'random'")
    vlm_model: str = option(TINY_VLM, "vision-language model: a folder saved by transformers or a cached hub id "
                            f"(llava-hf/llava-onevision-qwen2-0.5b-ov-hf, Qwen/Qwen2-VL-2B-Instruct, "
                            f"Salesforce/blip2-opt-2.7b); {TINY_VLM!r} is a ~6M-parameter random LLaVA-class model")
    summary_model: str = option(TINY_SUMMARY, "language model for the summary: a folder or a cached hub id "
                                f"(Qwen/Qwen2.5-0.5B-Instruct); {TINY_SUMMARY!r} is a ~6M-parameter random Llama")
    frames: int = option(3, "vlm: frames of a clip it sees, spread evenly over the clip (1 = the middle frame); a "
                         "model without a chat template sees the middle one", min=1, max=32)
    prompt: str = option("Describe this video in one sentence.", "vlm: the instruction given with the frames")
    template: str | None = option(None, "summary: the prompt, naming {caption} (source text), {caption_coca} and "
                                  "{caption_vlm}; null: a merge instruction naming the captions this stage makes")
    num_beams: int = option(1, "1 = greedy decoding; more = beam search (vlm and summary)", min=1, max=8)
    sample: bool = option(False, "vlm and summary: sample instead (temperature, top_p), each row from a seed of "
                          "(seed, backend, key), one row per model call")
    temperature: float = option(0.7, "sample: softmax temperature", min=0.01, max=5.0)
    top_p: float = option(0.9, "sample: nucleus mass", min=0.01, max=1.0)
    cache_dir: str | None = option(None, "Hugging Face hub cache to look in for tags and hub ids")
    allow_download: bool = option(False, "let open_clip and transformers download missing weights (needs network)")
    seed: int = option(0, "seed of random weights ('random' or the tiny models)")
    max_new_tokens: int = option(30, "the longest caption, in tokens (every backend)", min=1, max=MAX_TOKENS)
    batch_size: int = option(16, "pictures per model call", min=1, runtime=True)


def _resolve_coca(config: CaptionConfig, key: str):
    """The CoCa weights as local files, or a ConfigError naming ``coca_model`` / ``coca_pretrained``."""
    try:
        return clip_models.resolve_weights(config.coca_model, config.coca_pretrained, config.cache_dir,
                                           config.allow_download, f"{key}.coca")
    except ConfigError as exc:
        raise ConfigError(str(exc).replace(f"{key}.coca.", f"{key}.coca_")) from None


def template_of(config: CaptionConfig) -> str:
    return config.template if config.template is not None else default_template(config.backends)


def spread(n: int, k: int) -> list[int]:
    """``k`` indices into ``n`` frames, the middle of ``k`` equal spans (k = 1: the middle frame)."""
    k = min(k, n)
    return [int((j + 0.5) * n / k) for j in range(k)]


class CaptionImages(ModelStage):
    """Adds ``caption_<backend>`` per configured backend, and ``caption_issue``."""

    name = "caption"
    Config = CaptionConfig

    @classmethod
    def validate(cls, config: CaptionConfig, key: str, earlier: list[tuple[str, Any]]) -> None:
        super().validate(config, key, earlier)
        b = config.backends
        if not b:
            raise ConfigError(f"{key}.backends: give at least one captioner (coca, vlm, summary), or remove the stage")
        if len(set(b)) != len(b) or b != [x for x in BACKENDS if x in b]:
            raise ConfigError(f"{key}.backends: {b} must name each captioner once, in the order coca, vlm, summary "
                              f"(a summary merges the captions made before it)")
        if "coca" in b:
            if not config.coca_model.replace("/", "-").startswith(("coca", TINY_COCA)):
                raise ConfigError(f"{key}.coca_model: {config.coca_model!r} is not a CoCa model; give "
                                  f"coca_ViT-L-14, coca_ViT-B-32 or {TINY_COCA}")
            _resolve_coca(config, key)
        elif config.coca_pretrained is not None:
            raise ConfigError(f"{key}.coca_pretrained is set but backends has no coca; add coca or remove it")
        if "vlm" in b:
            resolve_hf(config.vlm_model, config.cache_dir, config.allow_download, f"{key}.vlm_model",
                       "image-text-to-text", (TINY_VLM,))
        if "summary" in b:
            resolve_hf(config.summary_model, config.cache_dir, config.allow_download, f"{key}.summary_model",
                       "causal-lm", (TINY_SUMMARY,))
            fields = template_fields(template_of(config), f"{key}.template")
            known = {CAPTION} | {f"caption_{x}" for x in b if x != "summary"}
            unknown = sorted(set(fields) - known)
            if unknown:
                raise ConfigError(f"{key}.template names {unknown}, which this stage does not make; it may name "
                                  f"{sorted(known)} (add the backend that writes a column, or drop it)")
        if config.sample and config.num_beams > 1:
            raise ConfigError(f"{key}.sample: sampling and beam search (num_beams {config.num_beams}) exclude each "
                              f"other; set num_beams: 1 or sample: false")
        if config.sample and not {"vlm", "summary"} & set(b):
            raise ConfigError(f"{key}.sample: only the vlm and summary backends sample (coca is greedy); remove it")
        defaults = CaptionConfig()
        if not config.sample and (config.temperature, config.top_p) != (defaults.temperature, defaults.top_p):
            raise ConfigError(f"{key}.temperature / top_p only shape sampling; set sample: true or remove them")
        for name, used in (("frames", "vlm"), ("prompt", "vlm"), ("template", "summary")):
            if getattr(config, name) != getattr(defaults, name) and used not in b:
                raise ConfigError(f"{key}.{name} is set but backends has no {used}; add {used} or remove it")
        for name, default, used in (("vlm_model", TINY_VLM, "vlm"), ("summary_model", TINY_SUMMARY, "summary")):
            if getattr(config, name) != default and used not in b:
                raise ConfigError(f"{key}.{name} is set but backends has no {used}; add {used} or remove it")

    @classmethod
    def notices(cls, config: CaptionConfig, earlier: list[tuple[str, Any]]) -> list[str]:
        out = []
        if "coca" in config.backends and clip_models.is_random(config.coca_pretrained):
            out.append(f"caption: {config.coca_model} runs on random weights (coca_pretrained: "
                       f"{config.coca_pretrained or 'none'}), so caption_coca is noise; give real weights in "
                       f"caption.coca_pretrained (coca_ViT-L-14 with mscoco_finetuned_laion2b_s13b_b90k)")
        for backend, model, preset in (("vlm", config.vlm_model, TINY_VLM),
                                       ("summary", config.summary_model, TINY_SUMMARY)):
            if backend in config.backends and model == preset:
                out.append(f"caption: {preset} runs on random weights, so caption_{backend} is noise; give a "
                           f"real model in caption.{backend}_model")
        return out

    def __init__(self, config: CaptionConfig | None = None):
        super().__init__(config or CaptionConfig())
        cfg = self.config
        device = torch_device(cfg)
        common = {"seed": cfg.seed, "device": device, "max_new_tokens": cfg.max_new_tokens,
                  "cache_dir": cfg.cache_dir, "allow_download": cfg.allow_download}
        hf = {"num_beams": cfg.num_beams, "sampling": (cfg.temperature, cfg.top_p) if cfg.sample else None}
        self.coca = CocaCaptioner(cfg.coca_model, cfg.coca_pretrained, **common) if "coca" in cfg.backends else None
        self.vlm = VlmCaptioner(cfg.vlm_model, cfg.prompt, **hf, **common) if "vlm" in cfg.backends else None
        self.summary = Summarizer(cfg.summary_model, template_of(cfg), **hf, **common) \
            if "summary" in cfg.backends else None

    def _pictures(self, data: list[bytes], which: list[int]) -> list:
        out = []
        for j in which:
            with open_image(data[j]) as im:
                out.append(im.convert("RGB"))
        return out

    def __call__(self, batch):
        issues = column(batch, CAPTION_ISSUE)
        rows: list[int] = []
        coca_in, vlm_in = [], []
        for i in np.flatnonzero(active(batch)):
            data = sample_images(batch, int(i))
            if not data:
                continue
            try:             # CoCa: a clip's middle frame (the SVD paper's); the vlm: frames spread over it
                if self.coca is not None:
                    coca_in.append(self.coca.prepare(self._pictures(data, [len(data) // 2])[0]))
                if self.vlm is not None:
                    row = self.vlm.prepare(self._pictures(data, spread(len(data), self.config.frames)))
                    vlm_in.append({**row, "seed": row_seed(self.config.seed, "vlm", str(batch[KEY][i]))})
                rows.append(int(i))
            except Exception as exc:  # noqa: BLE001 - a picture that cannot be read is a rejected row
                del coca_in[len(rows):], vlm_in[len(rows):]
                reject(batch, int(i), f"caption_error: {type(exc).__name__}: {exc}")
        made: dict[str, list] = {}
        if self.coca is not None:
            made["coca"] = self._batched(self.coca.caption, coca_in)
        if self.vlm is not None:
            made["vlm"] = self._batched(self.vlm.caption, vlm_in)
        if self.summary is not None:
            values = [{CAPTION: batch[CAPTION][i] if CAPTION in batch else None,
                       **{f"caption_{b}": made[b][n][0] for b in made}} for n, i in enumerate(rows)]
            rows_in = [{**self.summary.prepare(v), "seed": row_seed(self.config.seed, "summary", str(batch[KEY][i]))}
                       for v, i in zip(values, rows, strict=True)]
            made["summary"] = self._batched(self.summary.caption, rows_in)
        for backend, results in made.items():
            col = column(batch, f"caption_{backend}")
            for i, (text, _) in zip(rows, results, strict=True):
                col[i] = text
        for n, i in enumerate(rows):
            if batch[STATUS][i] == KEPT:
                found = [f"{b}:{made[b][n][1]}" for b in made if made[b][n][1]]
                issues[i] = ", ".join(found) or None
        return batch

    def _batched(self, run, inputs: list) -> list:
        step = self.config.batch_size
        return [r for start in range(0, len(inputs), step) for r in run(inputs[start:start + step])]


def accounts(config: CaptionConfig, texts: dict[str, list], issues: list) -> dict:
    """Per caption column of the kept rows: the model and its generation settings, how many rows got
    text, how many are empty, and the issues counted by reason (``summary.json``'s ``captions``)."""
    out = {}
    decoding = "greedy" if config.num_beams == 1 else f"beam search, {config.num_beams} beams"
    settings = {"max_new_tokens": config.max_new_tokens, "decoding": decoding}
    for b in config.backends:
        col = f"caption_{b}"
        got = texts.get(col) or []
        reasons: dict[str, int] = {}
        for issue in issues:
            for part in (issue or "").split(", "):
                if part.startswith(f"{b}:"):
                    reasons[part[len(b) + 1:]] = reasons.get(part[len(b) + 1:], 0) + 1
        model = {"coca": f"{config.coca_model} ({config.coca_pretrained or 'random weights'})",
                 "vlm": config.vlm_model, "summary": config.summary_model}[b]
        extra = {"vlm": {"frames": config.frames, "prompt": config.prompt},
                 "summary": {"template": template_of(config)}}.get(b, {})
        if config.sample and b != "coca":
            extra["decoding"] = (f"sampled (temperature {config.temperature:g}, top_p {config.top_p:g}), seeded by "
                                 f"(seed {config.seed}, backend, key)")
        written = sum(1 for t in got if t)
        out[col] = {"model": model, **settings, **extra, "rows": len(got), "written": written,
                    "empty": len(got) - written, "issues": dict(sorted(reasons.items()))}
    return out


__all__ = ["CaptionConfig", "CaptionImages", "accounts", "spread"]
