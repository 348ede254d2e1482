"""Captions from transformers' generic generation classes: ``VlmCaptioner`` (a vision-language model
through ``AutoModelForImageTextToText`` with the model's own processor and chat template: LLaVA,
Qwen2-VL, BLIP-2, Florence-2 class models) on one picture or several frames of a clip, and
``Summarizer`` (a causal language model through ``AutoModelForCausalLM``) that merges the other
captions into one with a prompt template, as the SVD paper captioned LVD (CoCa, a video captioner,
then an LLM summary of the two).

Decoding is greedy (or beam search) with a KV cache. A caption depends on its input alone, not on
the batch: each row is left-padded to a length that is a function of its own length (the next
multiple of ``PAD_TO`` past it, so there is always a pad and always a mask), rows of one padded
length run together, and batches never mix lengths.

Weights resolve offline like CLIP's: a preset name, a local folder saved by ``save_pretrained``,
or a hub id found in the hub cache; a download only with ``allow_download``. ``winnow-tiny-vlm``
(a LLaVA-class model: a CLIP vision tower and a Llama decoder) and ``winnow-tiny-summary`` (a
Llama decoder) are built in code with seeded random weights and CLIP's BPE vocabulary, for tests,
the demo and dry runs.
"""
from __future__ import annotations

import json
import os
import string
import tempfile
from dataclasses import dataclass

from pipeline.contract.config import ConfigError
from pipeline.models.captioner import MAX_TOKENS, caption_issue, clean_text, fit_picture

TINY_VLM = "winnow-tiny-vlm"
TINY_SUMMARY = "winnow-tiny-summary"
PAD_TO = 8                     # a row's padded length: the next multiple of this past its own length
FIELD_CHARS = 400              # each caption a summary template sees, at most (characters)
FIX = "put the model on local disk (save_pretrained) and give its folder, or set allow_download: true"
IMAGE_TOKEN = "<image>"
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {% if m['content'] is string %}{{ m['content'] }}"
                 "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}" + IMAGE_TOKEN +
                 "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}{{ '\\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


@dataclass
class HfWeights:
    """Where a transformers model comes from: ``path`` (a folder or, with allow_download, a hub id),
    or None for a built-in tiny preset."""

    name: str
    path: str | None
    model_type: str = ""


def _model_type(folder: str) -> str:
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as fh:
            return str(json.load(fh).get("model_type", ""))
    except (OSError, ValueError):
        return ""


def resolve_hf(model: str, cache_dir: str | None, allow_download: bool, key: str, task: str,
               presets: tuple[str, ...]) -> HfWeights:
    """``model`` as local files, or a ConfigError naming ``key`` and the fix. ``task`` is
    ``image-text-to-text`` or ``causal-lm``: a folder whose model type cannot do it is refused."""
    if model in presets:
        return HfWeights(model, None, "tiny")
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise ConfigError(f"{key}: folder {model!r} has no config.json; give a folder written by "
                              f"save_pretrained (or a hub snapshot), or one of {', '.join(presets)}")
        folder = model
    elif model.count("/") == 1 and not model.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download

        try:
            folder = snapshot_download(model, cache_dir=cache_dir, local_files_only=True)
        except Exception:  # noqa: BLE001 - not cached: the message below says what to do
            if allow_download:
                return HfWeights(model, model, "")
            raise ConfigError(f"{key}: {model!r} is not in the hub cache ({cache_dir or 'the default cache'}); "
                              f"{FIX}") from None
    else:
        raise ConfigError(f"{key}: {model!r} is neither a preset ({', '.join(presets)}), a folder, nor a hub id "
                          f"'org/name'")
    kind = _model_type(folder)
    _check_task(kind, task, key, model)
    names = os.listdir(folder)
    if not any(n.endswith((".safetensors", ".bin")) or n.endswith(".safetensors.index.json") for n in names):
        raise ConfigError(f"{key}: {folder!r} has a config.json but no weights (*.safetensors / *.bin); {FIX}")
    if not any(n in names for n in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")):
        raise ConfigError(f"{key}: {folder!r} has no tokenizer files (tokenizer.json / tokenizer_config.json); "
                          f"save the processor or tokenizer beside the model")
    return HfWeights(model, folder, kind)


def _check_task(kind: str, task: str, key: str, model: str) -> None:
    from transformers.models.auto import modeling_auto as auto

    names = (auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES if task == "image-text-to-text"
             else auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    if kind not in names:
        what, like = (("a vision-language (image-text-to-text) model", "llava, qwen2_vl, blip-2, florence2")
                      if task == "image-text-to-text" else ("a causal language model", "llama, qwen2, gpt2"))
        raise ConfigError(f"{key}: {model!r} has model_type {kind or 'unknown'!r}, which is not {what} in "
                          f"transformers; give e.g. a {like} class model")


# ---- the tiny presets, built in code ----

def _tiny_tokenizer(folder: str, image_token: bool):
    from pipeline.models.tokenizer import offline_clip_tokenizer

    tok = offline_clip_tokenizer(folder)
    if image_token:
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = 1024
    return tok


# decoder and vision sizes: the presets, and (for bench/captions.py) the size of a real small model
# with random weights: a Llama decoder shaped like Qwen2.5-0.5B and CLIP ViT-B/16's vision tower
TINY_DIMS = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 4, "inter": 128,
             "v_hidden": 32, "v_layers": 2, "v_heads": 2, "v_inter": 64, "image": 32, "patch": 8}
SMALL_DIMS = {"hidden": 896, "layers": 24, "heads": 14, "kv_heads": 2, "inter": 4864,
              "v_hidden": 768, "v_layers": 12, "v_heads": 12, "v_inter": 3072, "image": 224, "patch": 16}


def _tiny_llama(tok, seed: int, d: dict = TINY_DIMS):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tok), hidden_size=d["hidden"], intermediate_size=d["inter"],
                       num_hidden_layers=d["layers"], num_attention_heads=d["heads"],
                       num_key_value_heads=d["kv_heads"], max_position_embeddings=1024,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def tiny_vlm(seed: int = 0, d: dict = TINY_DIMS):
    """(model, processor): a ~6M-parameter LLaVA-class model (Liu et al., 2023: a CLIP vision tower,
    a projector, a Llama decoder) with seeded random weights and a chat template (``d``: other sizes)."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    with tempfile.TemporaryDirectory(prefix="winnow-tiny-vlm-") as folder:
        tok = _tiny_tokenizer(folder, image_token=True)
    side = d["image"]
    images = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    processor = LlavaProcessor(image_processor=images, tokenizer=tok, chat_template=CHAT_TEMPLATE,
                               patch_size=d["patch"], vision_feature_select_strategy="default",
                               num_additional_image_tokens=1)
    vision = CLIPVisionConfig(hidden_size=d["v_hidden"], intermediate_size=d["v_inter"],
                              num_hidden_layers=d["v_layers"], num_attention_heads=d["v_heads"], image_size=side,
                              patch_size=d["patch"], projection_dim=d["v_hidden"])
    config = LlavaConfig(vision_config=vision, text_config=_tiny_llama(tok, seed, d),
                         image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-1,
                         vision_feature_select_strategy="default")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval(), processor


def tiny_summary(seed: int = 0, d: dict = TINY_DIMS):
    """(model, tokenizer): a ~6M-parameter Llama decoder with seeded random weights (``d``: other sizes)."""
    import torch
    from transformers import LlamaForCausalLM

    with tempfile.TemporaryDirectory(prefix="winnow-tiny-summary-") as folder:
        tok = _tiny_tokenizer(folder, image_token=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(_tiny_llama(tok, seed, d))
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval(), tok


# ---- generation ----

class _Generator:
    """Greedy or beam decoding of prepared rows, each row padded by its own length only."""

    def __init__(self, model, tokenizer, device: str, max_new_tokens: int, num_beams: int,
                 sampling: tuple[float, float] | None = None):
        if not 1 <= max_new_tokens <= MAX_TOKENS:
            raise ValueError(f"max_new_tokens must be in 1..{MAX_TOKENS}")
        self.model, self.tokenizer, self.device = model.to(device), tokenizer, device
        self.max_new_tokens, self.num_beams = max_new_tokens, num_beams
        # (temperature, top_p): sampling, one row at a time from the row's own seed (``row["seed"]``),
        # since generate draws from one global generator for the whole batch
        self.sampling = sampling
        self.use_cache = True          # False only to measure what the KV cache saves (bench/captions.py)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos if eos is not None else tokenizer.eos_token_id])
        self.tokens_out = 0
        # a BPE with an end-of-word suffix (CLIP's '</w>'): transformers' CLIPTokenizer strips it in a
        # wrapper around its backend's decode that a reloaded tokenizer does not always keep
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.word_end = getattr(getattr(backend, "model", None), "end_of_word_suffix", None) or None

    def run(self, rows: list[dict]) -> list[tuple[str, str | None]]:
        """``rows``: the processor's outputs for one row each (``input_ids`` of shape (1, L) and any
        image tensors); returns (caption, issue) per row, in order."""
        import torch

        out: list = [None] * len(rows)
        groups: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            n = int(row["input_ids"].shape[-1])
            groups.setdefault((n // PAD_TO + 1) * PAD_TO, []).append(i)
        batches = [(w, m) for w, members in sorted(groups.items())
                   for m in ([[i] for i in members] if self.sampling else [members])]
        for width, members in batches:
            ids = torch.full((len(members), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(members), width), dtype=torch.long)
            extra: dict[str, list] = {}
            for j, i in enumerate(members):
                row = rows[i]
                n = int(row["input_ids"].shape[-1])
                ids[j, width - n:] = row["input_ids"].reshape(-1)
                mask[j, width - n:] = 1
                for name, value in row.items():
                    if name not in ("input_ids", "attention_mask") and torch.is_tensor(value):
                        extra.setdefault(name, []).append(value)
            kwargs = {k: torch.cat(v).to(self.device) for k, v in extra.items()}
            for k, v in kwargs.items():
                if v.is_floating_point():
                    kwargs[k] = v.to(self.model.dtype)
            decode = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
            if self.sampling:
                decode = {"do_sample": True, "temperature": self.sampling[0], "top_p": self.sampling[1], "top_k": None}
            devices = [torch.device(self.device)] if str(self.device).startswith("cuda") else []
            with torch.inference_mode(), torch.random.fork_rng(devices=devices):
                if self.sampling:
                    torch.manual_seed(int(rows[members[0]].get("seed", 0)))
                made = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                           max_new_tokens=self.max_new_tokens, num_beams=self.num_beams,
                                           pad_token_id=self.pad_id, use_cache=self.use_cache, **decode, **kwargs)
            # a decoder-only model returns the prompt and then the new tokens; an encoder-decoder
            # (Florence-2, BLIP-2 with T5) returns the new tokens alone
            made = made.cpu()
            echoed = made.shape[1] >= width and torch.equal(made[:, :width], ids)
            start = getattr(self.model.generation_config, "decoder_start_token_id", None)
            for j, i in enumerate(members):
                new = made[j, width:].tolist() if echoed else made[j].tolist()
                if not echoed and new and new[0] == start:     # BART's decoder starts from </s>
                    new = new[1:]
                out[i] = self._text(new)
        return out

    def _text(self, ids: list[int]) -> tuple[str, str | None]:
        cut = next((k for k, t in enumerate(ids) if t in self.eos), None)
        body = ids if cut is None else ids[:cut]
        self.tokens_out += len(body)
        text = self.tokenizer.decode(body, skip_special_tokens=True)
        text = clean_text(text.replace(self.word_end, " ") if self.word_end else text)
        return text, caption_issue(text, body, ended=cut is not None)


def _load(weights: HfWeights, auto_model: str, auto_pre: str, device: str, allow_download: bool):
    import torch
    import transformers

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    kw = {"local_files_only": not allow_download}
    pre = getattr(transformers, auto_pre).from_pretrained(weights.path, **kw)
    model = getattr(transformers, auto_model).from_pretrained(weights.path, dtype=dtype, **kw)
    return model.eval(), pre


class VlmCaptioner:
    """A vision-language model captioning a picture, or a clip from several of its frames where the
    model's chat template takes several images (one message, one image entry per frame); a model
    without a chat template (BLIP-2, Florence-2) sees the middle frame and ``prompt`` as its text."""

    def __init__(self, model: str = TINY_VLM, prompt: str = "Describe this video in one sentence.", seed: int = 0,
                 device: str = "cpu", max_new_tokens: int = 30, num_beams: int = 1, cache_dir: str | None = None,
                 allow_download: bool = False, key: str = "caption.vlm_model",
                 sampling: tuple[float, float] | None = None):
        self.weights = resolve_hf(model, cache_dir, allow_download, key, "image-text-to-text", (TINY_VLM,))
        self.name, self.random, self.prompt = model, self.weights.path is None, prompt
        if self.random:
            net, self.processor = tiny_vlm(seed)
        else:
            net, self.processor = _load(self.weights, "AutoModelForImageTextToText", "AutoProcessor", device,
                                        allow_download)
        self.chat = bool(getattr(self.processor, "chat_template", None))
        self.gen = _Generator(net, self.processor.tokenizer, device, max_new_tokens, num_beams, sampling)

    def prepare(self, frames: list) -> dict:
        """PIL frames of one row (one picture for an image) -> the processor's tensors."""
        pictures = [fit_picture(f) for f in frames]
        if not self.chat:
            return dict(self.processor(images=pictures[len(pictures) // 2], text=self.prompt, return_tensors="pt"))
        content = [{"type": "image"} for _ in pictures] + [{"type": "text", "text": self.prompt}]
        text = self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        return dict(self.processor(text=[text], images=pictures, return_tensors="pt"))

    def caption(self, rows: list[dict]) -> list[tuple[str, str | None]]:
        return self.gen.run(rows)


DEFAULT_TEMPLATE = ("Merge these descriptions of one video into a single short caption.\n"
                    "Frame: {caption_coca}\nVideo: {caption_vlm}\nSource text: {caption}\nCaption:")


def default_template(backends: list[str]) -> str:
    """``DEFAULT_TEMPLATE`` with only the lines of the captions made before the summary."""
    lines = DEFAULT_TEMPLATE.split("\n")
    keep = {"Frame": "coca" in backends, "Video": "vlm" in backends}
    return "\n".join(line for line in lines if keep.get(line.split(":")[0], True))


def row_seed(seed: int, backend: str, key: str) -> int:
    """A sampled caption's seed: a function of the run's seed, the backend and the row's key only."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(f"{seed}:{backend}:{key}".encode(), digest_size=8).digest(), "little") >> 1


def template_fields(template: str, key: str) -> list[str]:
    """The ``{names}`` a summary template uses, or a ConfigError for a malformed one."""
    try:
        names = [f for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}; write fields as {{caption_coca}}, literal braces as {{{{ }}}}") from None
    bad = [n for n in names if not n.isidentifier()]
    if bad or not names:
        raise ConfigError(f"{key}: the template must name caption columns as {{caption_coca}}, {{caption_vlm}}, "
                          f"{{caption}}; it has {bad or 'none'}")
    return names


class Summarizer:
    """A causal language model writing one caption from the others, the prompt ``template`` filled
    with each row's captions (each cleaned and cut to ``FIELD_CHARS``), wrapped in the tokenizer's
    chat template when it has one. The prompt keeps its last tokens when it is longer than the
    model's context less ``max_new_tokens`` (the template's closing instruction stays)."""

    def __init__(self, model: str = TINY_SUMMARY, template: str = DEFAULT_TEMPLATE, seed: int = 0,
                 device: str = "cpu", max_new_tokens: int = 30, num_beams: int = 1, cache_dir: str | None = None,
                 allow_download: bool = False, key: str = "caption.summary_model",
                 sampling: tuple[float, float] | None = None):
        self.weights = resolve_hf(model, cache_dir, allow_download, key, "causal-lm", (TINY_SUMMARY,))
        self.name, self.random, self.template = model, self.weights.path is None, template
        self.fields = template_fields(template, key.rsplit(".", 1)[0] + ".template")
        if self.random:
            net, self.tokenizer = tiny_summary(seed)
        else:
            net, self.tokenizer = _load(self.weights, "AutoModelForCausalLM", "AutoTokenizer", device, allow_download)
        self.chat = bool(getattr(self.tokenizer, "chat_template", None))
        context = int(getattr(net.config, "max_position_embeddings", 0) or 2048)
        self.max_prompt = max(16, context - max_new_tokens - PAD_TO)
        self.gen = _Generator(net, self.tokenizer, device, max_new_tokens, num_beams, sampling)

    def prompt(self, values: dict) -> str:
        filled = self.template.format_map({f: clean_text(str(values.get(f) or ""), FIELD_CHARS) for f in self.fields})
        if self.chat:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": filled}], tokenize=False,
                                                      add_generation_prompt=True)
        return filled

    def prepare(self, values: dict) -> dict:
        import torch

        ids = self.tokenizer(self.prompt(values), add_special_tokens=not self.chat)["input_ids"][-self.max_prompt:]
        return {"input_ids": torch.tensor([ids], dtype=torch.long)}

    def caption(self, rows: list[dict]) -> list[tuple[str, str | None]]:
        return self.gen.run(rows)


__all__ = ["DEFAULT_TEMPLATE", "HfWeights", "Summarizer", "TINY_SUMMARY", "TINY_VLM", "VlmCaptioner",
           "default_template", "resolve_hf", "row_seed", "template_fields", "tiny_summary", "tiny_vlm"]
