"""The train job spec, validated before Ray starts (``winnow train SPEC.yaml``)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from pipeline.contract import layout
from pipeline.contract.config import (
    ConfigError,
    RaySettings,
    apply_overrides,
    build,
    load_yaml,
    option,
    result_dict,
    take_kind,
    to_dict,
)
from training import captions
from training.captions import DEFAULT_FALLBACK


@dataclass
class DataSpec:
    shards: list[str] = option(
        factory=list, help="curated shard sets: `winnow curate` output folders (or their shards/)"
    )
    selection: str | None = option(None, "train on only the samples of a selection manifest (winnow sweep's "
                                         "selections/cell_NNN.parquet) instead of every kept sample of data.shards")
    resolution: int = option(512, "bucket base resolution: 512 (SD 1.x), 768 (SD 2 v), 1024 (SDXL)", min=64)
    max_aspect: float = option(2.0, "widest bucket aspect ratio (SDXL's table runs to 4.0)", min=1.0, max=8.0)
    bucket_step: int = option(64, "bucket sides are multiples of this", min=8)
    random_crop: bool = option(
        True, "random crop inside the covering resize (else centre); seeded per sample and epoch"
    )
    captions: dict = option(factory=dict, help="train on a mix of caption columns, drawn per sample and epoch with "
                            "these weights ({caption: 0.5, caption_vlm: 0.3, caption_summary: 0.2}; original = "
                            "caption); empty: the source caption")
    caption_fallback: list[str] = option(factory=lambda: list(DEFAULT_FALLBACK),
                                         help="where a sample's drawn caption column is empty, the first non-empty "
                                              "of these stands in")
    cache: bool = option(False, "precompute VAE latents and text embeddings once (a Ray Data pass) and train from "
                                "them; one centre crop per sample, so it needs random_crop: false")
    workers: int = option(4, "decode threads per training worker", min=1, runtime=True)
    prefetch: int = option(4, "batches decoded ahead of the step", min=1, runtime=True)
    shard_copy_gb: float = option(8.0, "shards on an object store: when all of them fit in this many GB, each "
                                       "training worker copies them whole into its node's scratch folder in the "
                                       "background and reads samples from the copies (0: never; else, or when "
                                       "they do not fit, one range request per sample)", min=0.0, runtime=True)


@dataclass
class ModelSpec:
    kind: Literal["sd", "sdxl", "svd", "svd_t2v", "svd_interp"] = option(
        "sd", "sd (SD 1.x / 2.x: one text encoder), sdxl (two, plus micro-conditioning), svd_t2v (text-to-video on "
              "curated clips), svd (image-to-video on curated clips) or svd_interp (frame interpolation: the "
              "frames between a clip's first and last)")
    pretrained: str | None = option(None, "diffusers pipeline folder or hub id; null builds the tiny random preset")
    allow_download: bool = option(False, "let a hub id download (otherwise only the local cache is used)")
    seed: int = option(0, "seed of the tiny preset's random weights")


@dataclass
class ObjectiveSpec:
    prediction_type: Literal["epsilon", "v_prediction"] | None = option(
        None, "null keeps the model's scheduler setting; v_prediction for SD 2 768-v")
    offset_noise: float = option(0.0, "per-channel noise offset (SDXL trained with 0.05)", min=0.0, max=1.0)
    caption_dropout: float = option(
        0.1, "share of captions replaced by '' (classifier-free guidance)", min=0.0, max=1.0
    )
    min_snr_gamma: float | None = option(None, "min-SNR-gamma loss weighting (5.0 in the paper); null is off", min=0.0)


@dataclass
class VideoSpec:
    buckets: dict = option(factory=lambda: {"256x384": {14: 1}},
                           help="video buckets {HEIGHTxWIDTH: {frames: batch per worker}}; each gives landscape, "
                                "portrait and square buckets (SVD: 14 frames at 256x384, then 320x576, 576x1024)")
    fps: float = option(7.0, "frames per second sampled from each clip (the model is told this rate)", min=0.1)
    min_fps: float = option(3.0, "clips slower than this are skipped", min=0.1)
    max_fps: float = option(30.0, "a short clip may be sampled up to this rate to give its frames", min=0.1)
    p_mean: float = option(0.7, "EDM: mean of ln sigma (SVD: 0.7 for image-to-video at 320x576, 1.0 at 576x1024)")
    p_std: float = option(1.6, "EDM: std of ln sigma", min=0.0)
    sigma_data: float = option(1.0, "EDM sigma_data (1.0 in SVD's v-parameterisation)", min=1e-3)
    noise_aug_mean: float = option(-3.0, "mean of ln(noise_aug_strength) of the conditioning frame")
    noise_aug_std: float = option(0.5, "std of ln(noise_aug_strength)", min=0.0)
    image_dropout: float = option(0.1, "share of samples whose CLIP image embedding is dropped (CFG)", min=0.0, max=1.0)
    concat_dropout: float = option(0.1, "share whose concatenated frame latent is dropped (CFG)", min=0.0, max=1.0)


@dataclass
class OptimSpec:
    lr: float = option(1e-4, "AdamW learning rate", min=0.0)
    weight_decay: float = option(1e-2, "AdamW weight decay", min=0.0)
    beta1: float = option(0.9, "AdamW beta1", min=0.0, max=1.0)
    beta2: float = option(0.999, "AdamW beta2", min=0.0, max=1.0)
    warmup_steps: int = option(0, "linear learning-rate warm-up steps, then constant", min=0)
    max_grad_norm: float = option(1.0, "gradient clipping norm (0 = off)", min=0.0)
    init_state: str | None = option(None, "a checkpoint folder (state.json + state.safetensors) whose AdamW "
                                          "moments a fresh run starts from (the curriculum's optimizer: carry); "
                                          "learning rate and betas stay this spec's")


@dataclass
class EmaSpec:
    enabled: bool = option(True, "keep an exponential moving average of the UNet; the export uses it")
    decay: float = option(0.9999, "EMA decay ceiling", min=0.0, max=1.0)
    start_step: int = option(0, "EMA copies the weights until this step, then averages (delayed start)", min=0)


@dataclass
class LoraSpec:
    enabled: bool = option(False, "train a LoRA adapter (Hu et al., 2021) through PEFT instead of the whole UNet: "
                                  "only the adapter has gradients and optimizer state, checkpoints hold only it, and "
                                  "the run exports OUTPUT/lora/pytorch_lora_weights.safetensors")
    rank: int = option(16, "adapter rank r", min=1)
    alpha: float | None = option(None, "LoRA alpha (the update is scaled by alpha / rank); null is the rank", min=0.0)
    dropout: float = option(0.0, "dropout on the adapter's input (seeded per step, so resume stays exact)",
                            min=0.0, max=1.0)
    targets: list[str] = option(factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
                                help="module names (suffixes) that get an adapter: the attention projections")
    layers: Literal["auto", "all", "temporal", "spatial"] = option(
        "auto", "which attention layers of a video UNet: temporal (SVD's camera-motion LoRAs), spatial or all; auto is "
                "temporal for svd / svd_t2v and all for image models")
    export_fused: bool = option(False, "also write OUTPUT/final, the pipeline with the adapter fused into the UNet")


@dataclass
class TrainSection:
    batch_size: int = option(4, "samples per worker per step (global batch = batch_size x ray.num_workers)", min=1)
    max_steps: int = option(1000, "optimizer steps in total (a resumed run continues to this)", min=1)
    seed: int = option(0, "seed of the schedule, crops, noise and caption dropout")
    mixed_precision: Literal["no", "bf16", "fp16"] = option(
        "no", "accelerate mixed precision (bf16 on H100/A100)", runtime=True
    )
    gradient_checkpointing: bool = option(False, "trade compute for activation memory", runtime=True)
    fsdp: bool = option(False, "shard the UNet, its gradients, optimizer state and EMA over the workers (torch "
                               "FSDP2 fully_shard); checkpoints stay unsharded", runtime=True)
    checkpoint_every: int = option(100, "steps between checkpoints (and one at the end)", min=1)
    keep_checkpoints: int = option(2, "checkpoints kept (oldest deleted)", min=1, runtime=True)
    log_every: int = option(10, "steps between logged metrics", min=1, runtime=True)
    sample_every: int = option(0, "steps between sample images (0 = only at the end)", min=0, runtime=True)
    sample_prompts: list[str] = option(
        factory=lambda: ["a photo of a dog"], help="prompts for the sample images", runtime=True
    )
    sample_steps: int = option(20, "sampler steps for the sample images", min=1, runtime=True)
    eval_every: int = option(0, "steps between validation passes (0 = off): a fixed-seed loss at fixed timesteps on a "
                                "held-out slice never trained on, and the CLIP score of the sample images", min=0)
    eval_fraction: float = option(0.02, "share of the samples held out for validation (a seeded split by key)",
                                  min=0.0, max=0.5)
    eval_max: int = option(64, "at most this many held-out samples", min=1)
    eval_clip_model: str | None = option(None, "open_clip model that scores the sample images at each validation "
                                               "(null: the tiny random CLIP, whose scores mean nothing)", runtime=True)
    eval_clip_pretrained: str | None = option(None, "its weights (an open_clip tag in the local cache, a file or a "
                                                    "folder), resolved as curation resolves them", runtime=True)


@dataclass
class RayTrainSpec(RaySettings):
    num_workers: int = option(2, "Ray Train workers (one per GPU on a cluster)", min=1, runtime=True)
    use_gpu: bool = option(False, "one GPU per worker, NCCL; false trains on CPU with gloo", runtime=True)
    cpus_per_worker: float = option(1.0, "CPUs reserved per worker", min=0.1, runtime=True)
    max_failures: int = option(
        0, "worker-group restarts from the last checkpoint before the run fails", min=0, runtime=True
    )
    min_workers: int | None = option(None, "elastic training: run with between min_workers and num_workers workers. "
                                     "After a lost node the group restarts (within max_failures) from the last "
                                     "checkpoint at the size that fits, and grows back when nodes return; the global "
                                     "batch follows the world size (the data cursor remaps)", min=1, runtime=True)


@dataclass
class TrainOutput:
    path: str = option(help="run folder: checkpoints, tensorboard/, samples/, final/ (the diffusers pipeline)")
    overwrite: bool = option(False, "delete an existing run made by a different spec instead of failing")


@dataclass
class TrainSpec:
    data: DataSpec
    output: TrainOutput
    model: ModelSpec = field(default_factory=ModelSpec)
    objective: ObjectiveSpec = field(default_factory=ObjectiveSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    ema: EmaSpec = field(default_factory=EmaSpec)
    train: TrainSection = field(default_factory=TrainSection)
    ray: RayTrainSpec = field(default_factory=RayTrainSpec)
    video: VideoSpec = field(default_factory=VideoSpec)
    lora: LoraSpec = field(default_factory=LoraSpec)

    def notices(self) -> list[str]:
        """What the user must be told once in the summary: models on random weights."""
        out = []
        if not self.model.pretrained:
            out.append(
                f"model.pretrained is null: the tiny {self.model.kind} preset with random weights (tests and the "
                f"demo); give a diffusers folder or hub id to train a real model"
            )
        if self.train.eval_every and self.train.eval_clip_pretrained in (None, "random"):
            out.append("train.eval_clip_pretrained is null: validation's CLIP score comes from a random CLIP and means "
                       "nothing; give an open_clip tag or weights file")
        return out

    def fingerprint(self) -> str:
        """What the trajectory depends on (not worker counts or logging): a run folder holds one."""
        doc = {k: result_dict(getattr(self, k)) for k in ("data", "model", "objective", "optim", "ema", "train")}
        if self.lora.enabled:                # a full run's fingerprint stays what it was
            doc["lora"] = result_dict(self.lora)
        doc["data"]["shards"] = [os.path.abspath(p) if "://" not in p else p for p in self.data.shards]
        if self.data.selection:
            doc["data"]["selection"] = os.path.abspath(self.data.selection)
        doc["train"].pop("max_steps")        # raising max_steps continues the same run
        doc["train"].pop("eval_every")       # how often to validate; the held-out split below is what trains
        if not self.train.eval_every:        # no validation: nothing is held out
            doc["train"].pop("eval_fraction")
            doc["train"].pop("eval_max")
        from training import families

        for section in families.get(self.model.kind).spec_sections():
            doc[section] = result_dict(getattr(self, section))
        return layout.fingerprint(doc)

    def to_dict(self) -> dict:
        return to_dict(self)


SECTIONS = {"data": DataSpec, "output": TrainOutput, "model": ModelSpec, "objective": ObjectiveSpec,
            "optim": OptimSpec, "ema": EmaSpec, "train": TrainSection, "ray": RayTrainSpec, "video": VideoSpec,
            "lora": LoraSpec}


def parse(data: dict[str, Any], check_paths: bool = True) -> TrainSpec:
    """Build and validate; ``check_paths=False`` on workers (the driver checked the files)."""
    data = take_kind(data, "train")
    unknown = set(data) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {sorted(unknown)}; a train spec has {', '.join(SECTIONS)}")
    for required in ("data", "output"):
        if not isinstance(data.get(required), dict):
            raise ConfigError(f"missing {required!r} section: a train spec needs data.shards and output.path")
    data = _switch_sections(data)
    spec = TrainSpec(**{k: build(cls, data.get(k) or {}, k) for k, cls in SECTIONS.items()})
    if not spec.data.shards:
        raise ConfigError("data.shards: give at least one curated shard set (a `winnow curate` output folder)")
    if spec.data.resolution % spec.data.bucket_step:
        raise ConfigError(f"data.resolution: {spec.data.resolution} is not a multiple of data.bucket_step "
                          f"({spec.data.bucket_step})")
    if spec.data.cache and spec.data.random_crop:
        raise ConfigError("data.cache: the cache holds one crop per sample; set data.random_crop: false with it")
    captions.check(spec.data.captions, spec.data.caption_fallback, spec.data.cache)
    if spec.data.bucket_step % 8:
        raise ConfigError("data.bucket_step: must be a multiple of 8 (the VAE downsamples by 8)")
    if spec.train.fsdp and spec.train.mixed_precision == "fp16":
        raise ConfigError("train.fsdp: use mixed_precision bf16 (or no) with FSDP; fp16's gradient scaler is not "
                          "wired for sharded gradients")
    if spec.train.mixed_precision == "fp16" and not spec.ray.use_gpu:
        raise ConfigError("train.mixed_precision: fp16 needs GPUs (ray.use_gpu: true); use bf16 or no on CPU")
    if spec.ray.min_workers is not None and spec.ray.min_workers > spec.ray.num_workers:
        raise ConfigError(f"ray.min_workers: {spec.ray.min_workers} is more than ray.num_workers "
                          f"{spec.ray.num_workers}; elastic runs take between the two")
    if spec.ray.min_workers is not None and not spec.ray.max_failures:
        raise ConfigError("ray.min_workers: an elastic group resizes when it restarts after a failure; set "
                          "ray.max_failures to at least 1")
    for p in spec.data.shards if check_paths else []:
        if "://" not in p and not os.path.isdir(p):
            raise ConfigError(f"data.shards: {p!r} does not exist; give a `winnow curate` output folder")
    from pipeline.contract import storage

    if spec.optim.init_state and check_paths and not storage.isfile(storage.join(spec.optim.init_state, "state.json")):
        raise ConfigError(f"optim.init_state: {spec.optim.init_state!r} has no state.json; give a checkpoint folder "
                          f"(OUTPUT/ray/train/checkpoint_NNNNNNN)")
    if spec.data.selection and check_paths and not storage.exists(spec.data.selection):
        raise ConfigError(
            f"data.selection: {spec.data.selection!r} does not exist; give a manifest from `winnow sweep` "
            f"(selections/cell_NNN.parquet)"
        )
    from training import families

    families.get(spec.model.kind).check_spec(spec)
    if spec.lora.enabled:
        _check_lora(spec)
    if spec.train.eval_every and (spec.train.eval_clip_model or spec.train.eval_clip_pretrained):
        from pipeline.models.clip import TINY_CLIP, resolve_weights

        resolve_weights(spec.train.eval_clip_model or TINY_CLIP, spec.train.eval_clip_pretrained, key="train.eval_clip")
    if spec.model.pretrained and check_paths:
        families.get(spec.model.kind).check_pretrained(spec.model.pretrained)
    return spec


def _switch_sections(data: dict[str, Any]) -> dict[str, Any]:
    """No silent settings in sections with an ``enabled`` switch (lora, ema): a section given without
    ``enabled`` turns it on (``--set lora.rank=4`` trains a LoRA), and options beside an explicit
    ``enabled: false`` are an error (they would do nothing)."""
    out = dict(data)
    for name, cls in SECTIONS.items():
        section = data.get(name)
        if not isinstance(section, dict) or "enabled" not in {f.name for f in fields(cls)}:
            continue
        defaults = to_dict(cls())
        others = sorted(k for k in section if k != "enabled" and section[k] != defaults.get(k, object()))
        if "enabled" not in section and others:
            out[name] = {**section, "enabled": True}
        elif section.get("enabled") is False and others:
            raise ConfigError(f"{name}: {', '.join(f'{name}.{k}' for k in others)} would do nothing with "
                              f"{name}.enabled: false; remove them, or set {name}.enabled: true")
    return out


def _check_lora(spec: TrainSpec) -> None:
    lo = spec.lora
    if spec.train.fsdp:
        raise ConfigError("lora.enabled: an adapter is small enough to replicate; set train.fsdp: false with LoRA")
    if not lo.targets or not all(isinstance(t, str) and t for t in lo.targets):
        raise ConfigError("lora.targets: give module names, e.g. [to_q, to_k, to_v, to_out.0]")


def load(path: str | None = None, overrides: list[str] | None = None) -> TrainSpec:
    data = load_yaml(path) if path else {}
    data.pop("fingerprint", None)           # a run's own train_spec.yaml loads as a spec
    return parse(apply_overrides(data, overrides or []))


__all__ = ["TrainSpec", "load", "parse"]
