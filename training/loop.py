"""The Ray Train worker: SD / SDXL training, resumable to the sample (the driver is
``pipeline/commands/train.py``).

Each worker builds an accelerate ``Accelerator`` (gloo on CPU, NCCL on GPUs; Ray has already
formed the process group), the model family's components, AdamW, the EMA, and its
``BucketLoader`` slice of the global schedule.

Every random draw of step ``s`` on rank ``r`` (VAE posterior sample, noise, offset, timesteps,
caption dropout) comes from a generator seeded by (seed, s, r), and crops are seeded by (seed,
epoch, sample). A checkpoint holds the UNet and the EMA UNet in diffusers format, the optimizer
and learning-rate state, the step and the loader cursor (``training/checkpoint.py``), so a resumed
run takes exactly the steps the uninterrupted one would have. The end of the run exports
``OUTPUT/final``, a complete diffusers pipeline folder.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

from pipeline.contract import layout, storage
from pipeline.contract.layout import TrainRun
from pipeline.contract.media import gif_frames, open_image, write_gif
from training import families
from training.checkpoint import restore_checkpoint, save_checkpoint
from training.objectives import caption_keep
from training.schedule import Cursor, seeded_rng
from training.train_spec import TrainSpec


def step_seed(seed: int, step: int, rank: int, what: str = "noise") -> int:
    return int(seeded_rng(seed, what, step, rank).integers(0, 2 ** 62))


class _Metrics:
    """Rank 0's TensorBoard writer and metrics.jsonl.

    An object store has no append: with an output URL both are written in this node's scratch
    folder (metrics.jsonl first fetched from the output, so a resumed run continues it) and uploaded
    whole by ``sync`` at every checkpoint and at the end. Steps after the last checkpoint of a killed
    run are trained again anyway; their lines come back with them."""

    def __init__(self, out: str, enabled: bool):
        self.enabled = enabled
        self.writer = None
        self.out, self.local = out, None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            folder = out
            if storage.is_url(out):
                self.local = folder = tempfile.mkdtemp(prefix="winnow-metrics-", dir=storage.scratch_root())
                with contextlib.suppress(FileNotFoundError):
                    storage.download(TrainRun(out).metrics, os.path.join(folder, TrainRun.METRICS))
            self.writer = SummaryWriter(os.path.join(folder, TrainRun.TENSORBOARD))
            self.jsonl = open(os.path.join(folder, TrainRun.METRICS), "a", encoding="utf-8")

    def sync(self) -> None:
        """Upload what a URL output lacks: metrics.jsonl and this writer's event files, whole."""
        if not self.enabled or self.local is None:
            return
        if not self.jsonl.closed:
            self.writer.flush()
            self.jsonl.flush()
        storage.upload(os.path.join(self.local, TrainRun.METRICS), TrainRun(self.out).metrics)
        tb = os.path.join(self.local, TrainRun.TENSORBOARD)
        for name in sorted(os.listdir(tb)):
            storage.upload(os.path.join(tb, name), storage.join(TrainRun(self.out).tensorboard, name))

    def log(self, step: int, values: dict, group: str = "train") -> None:
        if not self.enabled:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)) and k != "step":
                self.writer.add_scalar(f"{group}/{k.removeprefix(group + '_')}", v, step)
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()

    def image(self, tag: str, array: np.ndarray, step: int) -> None:
        if self.enabled:
            self.writer.add_image(tag, array, step, dataformats="HWC")

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()
            if self.local is not None:
                self.sync()
                shutil.rmtree(self.local, ignore_errors=True)


@dataclass
class Worker:
    """Everything one worker trains with."""

    spec: TrainSpec
    config: dict
    acc: object
    family: families.Family
    comps: object
    unet: object                     # as accelerate prepared it
    raw_unet: object                 # the module itself
    optimizer: object
    lr_sched: object
    ema: object
    loader: object
    buckets: list
    weight_dtype: object
    vae_dtype: object
    metrics: _Metrics
    rank: int = 0
    world: int = 1
    step: int = 0
    empty: tuple = (None, None)      # the latent cache's empty-caption context and pooled embedding
    trainable: list = field(default_factory=list)   # what the optimizer and EMA see: the UNet, or its LoRA adapter

    @property
    def states(self) -> dict:
        """What a checkpoint saves and restores, by name (``training.checkpoint``)."""
        return states_of(self.spec, self.raw_unet, self.ema, self.optimizer, self.lr_sched)


def states_of(spec: TrainSpec, unet, ema, optimizer, lr_sched) -> dict:
    """The checkpoint's entries: the UNet and its EMA in diffusers format, or with LoRA the adapter
    and its EMA alone (``training.lora``)."""
    if spec.lora.enabled:
        from training.lora import AdapterWeights, EmaWeights

        return {"adapter": AdapterWeights(unet), "ema_adapter": None if ema is None else EmaWeights(ema),
                "optimizer": optimizer, "lr_scheduler": lr_sched}
    return {"unet": unet, "ema_unet": ema, "optimizer": optimizer, "lr_scheduler": lr_sched}


def _components(spec: TrainSpec):
    """The run's models. A tiny preset's tokenizer passes through a temporary folder that is gone
    before training starts, so a worker killed mid-run leaves no folder behind."""
    m = spec.model
    with tempfile.TemporaryDirectory(prefix="winnow-train-") as scratch:
        return families.get(m.kind).components(m.pretrained, m.allow_download, m.seed, scratch,
                                               spec.objective.prediction_type)


def _frozen_models(spec: TrainSpec, comps, device):
    """Move the VAE and text encoders to the device, frozen; returns (weight dtype, VAE dtype)."""
    import torch

    weight_dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[spec.train.mixed_precision]
    vae_dtype = weight_dtype
    if weight_dtype == torch.float16 and comps.vae.config.get("force_upcast", True):
        vae_dtype = torch.float32                          # SD / SDXL VAEs overflow in fp16
    comps.vae.to(device, dtype=vae_dtype).requires_grad_(False).eval()
    for enc in comps.text_encoders:
        enc.to(device, dtype=weight_dtype).requires_grad_(False).eval()
    return weight_dtype, vae_dtype


def _optimizer(spec: TrainSpec, params):
    import torch

    optimizer = torch.optim.AdamW(params, lr=spec.optim.lr, betas=(spec.optim.beta1, spec.optim.beta2),
                                  weight_decay=spec.optim.weight_decay)
    warm = spec.optim.warmup_steps
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    return optimizer, lr_sched


def _clip_loader(spec: TrainSpec, config: dict, index, cursor: Cursor, rank: int, world: int):
    """(the rank's ClipLoader over video buckets, the bucket list, no cache embeddings)."""
    from training.conditioning import MotionBucketMap
    from training.index import clip_bucket_ids
    from training.loader import ClipLoader

    buckets, bucket_of = clip_bucket_ids(index, spec.video)
    motion = MotionBucketMap.from_dict(json.loads(storage.read_bytes(TrainRun(config["output"]).motion)))
    ids = motion(index.column("motion_score").to_numpy(zero_copy_only=False))      # a null score is NaN: bucket 128
    v = spec.video
    loader = ClipLoader(index, buckets, bucket_of, cursor, rank, world, spec.train.seed, spec.data.random_crop,
                        spec.data.workers, spec.data.prefetch, v.fps, v.min_fps, v.max_fps, ids,
                        shard_copy_bytes=int(spec.data.shard_copy_gb * 2 ** 30))
    return loader, buckets, (None, None)


def _loader(spec: TrainSpec, config: dict, cursor: Cursor, rank: int, world: int, device):
    """(the rank's BucketLoader, the bucket list, the cache's empty-caption embeddings)."""
    import torch

    from training.index import bucket_ids
    from training.loader import BucketLoader

    index = layout.read_table(config["index_path"])
    if families.get(spec.model.kind).clips:
        return _clip_loader(spec, config, index, cursor, rank, world)
    buckets, bucket_of = bucket_ids(index, spec.data.resolution, spec.data.bucket_step, spec.data.max_aspect)
    cache, empty = None, (None, None)
    if config.get("cache_dir"):
        from training.cache import LatentCache

        cache = LatentCache(config["cache_dir"], buckets, bucket_of)
        empty = (torch.from_numpy(cache.empty).float().to(device),
                 None if cache.empty_pooled is None else torch.from_numpy(cache.empty_pooled).float().to(device))
    loader = BucketLoader(index, buckets, bucket_of, cursor, spec.train.batch_size, rank, world, spec.train.seed,
                          spec.data.random_crop, spec.data.workers, spec.data.prefetch, cache=cache,
                          shard_copy_bytes=int(spec.data.shard_copy_gb * 2 ** 30))
    return loader, buckets, empty


def build(config: dict) -> Worker:
    """Accelerator, models, optimizer, EMA, the restored checkpoint (if any) and the loader."""
    import ray.train
    from accelerate import Accelerator
    from diffusers.models.attention_processor import AttnProcessor2_0
    from diffusers.training_utils import EMAModel

    from training.train_spec import parse

    spec = parse(config["spec"], check_paths=False)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    acc = Accelerator(mixed_precision=spec.train.mixed_precision, cpu=not spec.ray.use_gpu)
    comps = _components(spec)
    weight_dtype, vae_dtype = _frozen_models(spec, comps, acc.device)
    unet = comps.unet
    unet.set_attn_processor(AttnProcessor2_0())           # PyTorch SDPA
    if spec.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    trainable = list(unet.parameters())
    if spec.lora.enabled:                                 # only the adapter trains
        from training.lora import add_lora

        trainable = add_lora(unet, spec.lora, families.get(comps.kind).clips, spec.model.seed)
    unet.train()
    optimizer, lr_sched = _optimizer(spec, trainable)
    ema = None
    if spec.ema.enabled:
        ema = EMAModel(trainable, decay=spec.ema.decay, update_after_step=spec.ema.start_step,
                       **({} if spec.lora.enabled else {"model_cls": type(unet), "model_config": unet.config}))
    step, cursor = 0, Cursor()
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            step, cursor = restore_checkpoint(d, states_of(spec, unet, ema, optimizer, lr_sched))
    elif spec.optim.init_state:                           # a fresh run carrying an earlier run's AdamW moments
        from training.checkpoint import carry_optimizer

        carry_optimizer(spec.optim.init_state, optimizer, trainable)
    if ema is not None:
        ema.to(acc.device)
    if spec.train.fsdp:                                   # shard after the (unsharded) restore
        from training.sharding import shard_training

        unet.to(acc.device)
        optimizer, lr_sched = shard_training(unet, optimizer, lr_sched, ema, lambda m: _optimizer(spec, m.parameters()))
        trainable = list(unet.parameters())               # the shards replaced the parameters (no LoRA with FSDP)
        prepared, optimizer = unet, acc.prepare(optimizer)   # no DDP wrapper: FSDP reduces the gradients
    else:
        prepared, optimizer = acc.prepare(unet, optimizer)
    loader, buckets, empty = _loader(spec, config, cursor, rank, world, acc.device)
    metrics = _Metrics(config["output"], acc.is_main_process)
    if step and acc.is_main_process:
        print(f"winnow train: resumed at step {step} (epoch {cursor.epoch})", flush=True)
    return Worker(spec, config, acc, families.get(comps.kind), comps, prepared, acc.unwrap_model(prepared), optimizer,
                  lr_sched, ema, loader, buckets, weight_dtype, vae_dtype, metrics, rank, world, step, empty,
                  trainable)


def conditioning(w: Worker, batch, keep: np.ndarray, g):
    """(scaled latents, text context, pooled embedding or None) for a batch: encoded now, or read
    from the latent cache; dropped captions become the empty caption."""
    import torch

    device = w.acc.device
    latent_dtype = w.weight_dtype if w.weight_dtype != torch.float16 else torch.float32
    with torch.no_grad():
        if batch.latents is None:
            dist = w.comps.vae.encode(batch.pixels.to(device, dtype=w.vae_dtype)).latent_dist
            mean, std = dist.mean, dist.std
            context, pooled = w.family.encode_text(
                w.comps, [c if k else "" for c, k in zip(batch.captions, keep, strict=True)], device
            )
        else:                                   # data.cache: latents and text precomputed
            mean, std = batch.latents[:, 0].to(device), batch.latents[:, 1].to(device)
            mask = torch.from_numpy(keep).to(device)
            empty_context, empty_pooled = w.empty
            context = torch.where(mask[:, None, None], batch.context.to(device), empty_context)
            pooled = None if batch.pooled is None else torch.where(mask[:, None], batch.pooled.to(device), empty_pooled)
        latents = mean + std * torch.randn(mean.shape, generator=g).to(device, mean.dtype)
        latents = (latents * w.comps.vae.config.scaling_factor).to(latent_dtype)
        context = context.to(w.weight_dtype)
        pooled = None if pooled is None else pooled.to(w.weight_dtype)
    return latents, context, pooled


def _optimize(w: Worker, loss) -> float:
    """Backward, clip, step, schedule, EMA; the loss averaged over every rank."""
    w.acc.backward(loss)
    if w.spec.optim.max_grad_norm:
        from training import sharding

        clip = sharding.clip_grad_norm_ if w.spec.train.fsdp else w.acc.clip_grad_norm_
        clip(w.trainable, w.spec.optim.max_grad_norm)
    w.optimizer.step()
    w.lr_sched.step()
    w.optimizer.zero_grad(set_to_none=True)
    if w.ema is not None:
        w.ema.step(w.trainable)
    w.step += 1
    return w.acc.gather(loss.detach()[None]).mean().item()


def _seed_dropout(w: Worker) -> None:
    """LoRA dropout draws from torch's global generator: seed it by (seed, step, rank) so a resumed
    run drops what the uninterrupted one would have."""
    if w.spec.lora.enabled and w.spec.lora.dropout:
        import torch

        torch.manual_seed(step_seed(w.spec.train.seed, w.step, w.rank, "dropout"))


def video_step(w: Worker, batch) -> float:
    """One video step (the family's EDM loss); noise drawn from (seed, step, rank), each
    classifier-free-guidance drop from its own (seed, name, step, rank) stream."""
    import torch

    spec, device = w.spec, w.acc.device
    g = torch.Generator("cpu").manual_seed(step_seed(spec.train.seed, w.step, w.rank))
    n = len(batch.ids)
    _seed_dropout(w)

    def keep(name: str, p: float) -> torch.Tensor:
        return torch.from_numpy(caption_keep(n, p, seeded_rng(spec.train.seed, name, w.step, w.rank)))

    with w.acc.autocast():
        loss = w.family.step_loss(w.comps, batch.frames.to(device, w.vae_dtype), batch, spec, g, keep, w.unet).mean()
    return _optimize(w, loss)


def train_step(w: Worker, batch) -> float:
    """One optimizer step on ``batch``; returns the loss averaged over every rank."""
    import torch
    import torch.nn.functional as F

    from training import objectives as obj

    if w.family.clips:
        return video_step(w, batch)
    spec, device = w.spec, w.acc.device
    sched = w.comps.noise_scheduler
    ac = sched.alphas_cumprod.to(device)
    g = torch.Generator("cpu").manual_seed(step_seed(spec.train.seed, w.step, w.rank))
    keep = obj.caption_keep(len(batch.ids), spec.objective.caption_dropout,
                            seeded_rng(spec.train.seed, "captions", w.step, w.rank))
    latents, context, pooled = conditioning(w, batch, keep, g)
    noise = obj.offset_noise(torch.randn(latents.shape, generator=g), spec.objective.offset_noise, g).to(
        device, latents.dtype
    )
    t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=g).to(device)
    noisy = obj.add_noise(latents, noise, t, ac)
    target = obj.target(w.comps.prediction_type, latents, noise, t, ac)
    added = w.family.unet_conditions(pooled, batch.time_ids, device)
    _seed_dropout(w)
    with w.acc.autocast():
        pred = w.unet(noisy, t, context, added_cond_kwargs=added).sample
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))
    if spec.objective.min_snr_gamma:
        per_sample = per_sample * obj.min_snr_weights(t, ac, spec.objective.min_snr_gamma, w.comps.prediction_type)
    return _optimize(w, per_sample.mean())


def video_samples(w: Worker, step: int, unet) -> list[str]:
    """Rank 0, clip families: videos from the family's sampler (image-to-video: the first training
    clip's first frame; text-to-video: the sample prompts, else that clip's caption) at the run's
    fps, as GIFs and, in TensorBoard, frames side by side."""
    from PIL import Image

    from training.video_frames import decode_frames

    spec, loader = w.spec, w.loader
    first = int(np.flatnonzero(loader.bucket_of >= 0)[0])
    bucket = w.buckets[int(loader.bucket_of[first])]

    def first_frame():
        return Image.fromarray(decode_frames(loader.reader.read(first), [0.0])[0][0]).resize(
            (bucket.width, bucket.height)
        )

    prompts = list(spec.train.sample_prompts) or [loader.captions[first]]
    with w.acc.autocast():
        videos = w.family.sample_videos(w.comps, unet, bucket, spec.train.sample_steps, spec.video.fps,
                                        spec.train.seed, w.acc.device, prompts, first_frame)
    folder = TrainRun(w.config["output"]).samples
    storage.makedirs(folder)
    paths = []
    for k, frames in enumerate(videos):
        paths.append(storage.join(folder, f"step{step:07d}_{k}.gif"))
        with storage.local_target(paths[-1]) as tmp:
            write_gif(frames, tmp, spec.video.fps)
        w.metrics.image(f"samples/video_{k}", np.concatenate([np.asarray(f) for f in frames], axis=1), step)
    return paths


def samples(w: Worker, step: int, unet) -> list[str]:
    """Rank 0: the spec's sample prompts through the family's pipeline, as PNGs and TensorBoard images."""
    import torch

    unet.eval()                               # no dropout (a LoRA's) while sampling; the loop sets train() again
    if w.family.clips:
        return video_samples(w, step, unet)
    spec = w.spec
    pipe = w.family.build_pipeline(w.comps, unet).to(w.acc.device)
    pipe.set_progress_bar_config(disable=True)
    folder = TrainRun(w.config["output"]).samples
    storage.makedirs(folder)
    paths = []
    for k, prompt in enumerate(spec.train.sample_prompts):
        g = torch.Generator("cpu").manual_seed(spec.train.seed + k)
        with w.acc.autocast():
            img = pipe(prompt, num_inference_steps=spec.train.sample_steps, height=spec.data.resolution,
                       width=spec.data.resolution, generator=g).images[0]
        path = storage.join(folder, f"step{step:07d}_{k}.png")
        with storage.local_target(path) as tmp:
            img.save(tmp, format="PNG")
        w.metrics.image(f"samples/{k}", np.asarray(img), step)
        paths.append(path)
    return paths


@contextlib.contextmanager
def full_unet(w: Worker, ema_weights: bool = False):
    """Every rank enters this: yields the UNet whole on rank 0 (None elsewhere when sharded), with
    the EMA weights when ``ema_weights`` and the run keeps an EMA; the training weights are back
    on exit."""
    swap = ema_weights and w.ema is not None
    if swap:
        w.ema.store(w.trainable)
        w.ema.copy_to(w.trainable)
    try:
        if w.spec.train.fsdp:
            from training.sharding import gather_module

            yield gather_module(w.raw_unet)
        else:
            yield w.raw_unet
    finally:
        if swap:
            w.ema.restore(w.trainable)


def checkpoint(w: Worker, report: dict) -> None:
    """Report ``report`` to Ray Train; rank 0 attaches a checkpoint of ``w.states`` (gathered
    whole from every rank first when sharded)."""
    import ray.train

    states = w.states
    if w.spec.train.fsdp:
        from training.sharding import gathered

        states = gathered(w.raw_unet, w.optimizer, w.lr_sched, w.ema)
    if not w.acc.is_main_process:
        ray.train.report(report)
        return
    folder = tempfile.mkdtemp(prefix="winnow-ckpt-")
    state = w.loader.state()
    save_checkpoint(folder, states, w.step, state, {"epoch": state.epoch, "world_size": w.world,
                                                      "fingerprint": w.config["fingerprint"]})
    w.metrics.sync()        # before the checkpoint: metrics on the store reach at least the step it holds
    ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(folder),
                     checkpoint_dir_name=f"checkpoint_{w.step:07d}")
    shutil.rmtree(folder, ignore_errors=True)


def _publish(folder: str, write) -> str:
    """``write(tmp)`` into ``folder + '.tmp'``, then swap it in whole. On a store (no rename) it is
    written in this node's scratch and uploaded file by file over what was there; summary.json,
    written after it, vouches that it is complete."""
    if storage.is_url(folder):
        with storage.scratch("winnow-export-") as d:
            tmp = os.path.join(d, "out")
            write(tmp)
            storage.remove_tree(folder)
            for path in storage.find(tmp):
                storage.upload(path, storage.join(folder, os.path.relpath(path, tmp)))
        return folder
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def _export_pipeline(w: Worker, comps, unet, folder: str) -> str:
    """A diffusers pipeline folder of ``comps`` with ``unet``, plus the run's motion-bucket map (svd)."""
    motion = TrainRun(w.config["output"]).motion   # svd: the map inference must condition with

    def write(tmp: str) -> None:
        w.family.export(comps, unet, tmp)
        if storage.exists(motion):
            storage.download(motion, os.path.join(tmp, TrainRun.MOTION))

    return _publish(folder, write)


def _export_lora(w: Worker, unet) -> dict:
    """``OUTPUT/lora`` (the adapter in diffusers' format) and, for the tiny preset, ``OUTPUT/base``
    (the pipeline it applies to, written once); with ``lora.export_fused`` also ``OUTPUT/final``."""
    from training import lora

    out, spec = w.config["output"], w.spec
    base = spec.model.pretrained
    if not base:
        base = TrainRun(out).base
        if not storage.isdir(base):
            fresh = _components(spec)           # the preset again, without the adapter
            _export_pipeline(w, fresh, fresh.unet, base)
        base = storage.absolute(base)
    folder = _publish(
        TrainRun(out).lora,
        lambda tmp: lora.export(
            unet,
            tmp,
            {
                "base": base,
                "kind": spec.model.kind,
                "steps": w.step,
                "layers": lora.layer_set(spec.lora, w.family.clips),
            },
        ),
    )
    return {"lora": folder, "base": base, "adapter_parameters": sum(p.numel() for p in w.trainable)}


def finish(w: Worker, first_step: int, started: float, unet) -> None:
    """Rank 0: export ``OUTPUT/final`` with ``unet`` (from ``full_unet(w, ema_weights=True)``) or,
    with LoRA, ``OUTPUT/lora``; the last samples and summary.json."""
    import torch

    out, spec, ema = w.config["output"], w.spec, w.ema
    # the frozen parts were cast to the training dtype: export pristine copies beside the UNet
    pristine = w.comps if w.weight_dtype == torch.float32 else None
    final, extra = None, {}
    if spec.lora.enabled:
        extra = _export_lora(w, unet)
    if not spec.lora.enabled or spec.lora.export_fused:
        from training.lora import fused

        final = _export_pipeline(w, pristine or _components(spec),
                                 fused(unet) if spec.lora.enabled else unet, TrainRun(out).final)
    sample_paths = samples(w, w.step, unet) if spec.train.sample_prompts or w.family.clips else []
    step = w.step
    summary = {"steps": step, "steps_this_run": step - first_step, "resumed_from": first_step,
               "epoch": w.loader.state().epoch, "global_batch": spec.train.batch_size * w.world,
               "world_size": w.world, "samples_this_run": (step - first_step) * spec.train.batch_size * w.world,
               "wall_s": round(time.time() - started, 2), "data_wait_s": round(w.loader.wait_s, 3),
               "final": final, **extra, "ema": ema is not None, "samples": sample_paths,
               "prediction_type": w.comps.prediction_type, "kind": w.comps.kind,
               "distributed": "FSDP2" if spec.train.fsdp else str(w.acc.distributed_type),
               "num_processes": w.acc.num_processes, "warnings": spec.notices()}
    w.metrics.sync()
    layout.atomic_write(TrainRun(out).summary, json.dumps(summary, indent=2).encode())


def validate(w: Worker, step: int, validation, scorer: list) -> None:
    """Every rank: the held-out loss; rank 0 also samples the prompts and scores them with CLIP
    (``scorer`` holds the CLIP model once made). Logged as val/ in TensorBoard and metrics.jsonl."""
    values = {"val_loss": validation.loss(w, conditioning), "val_samples": validation.samples}
    spec = w.spec
    with full_unet(w) as unet:
        if w.acc.is_main_process and (spec.train.sample_prompts or w.family.clips):
            from training.evaluate import ClipScorer

            paths = samples(w, step, unet)
            if not scorer:
                scorer.append(ClipScorer(spec.train.eval_clip_model, spec.train.eval_clip_pretrained, spec.train.seed))
            prompts = list(spec.train.sample_prompts) or [w.loader.captions[0]]
            if w.family.clips:
                frames = gif_frames(paths[0])
                values["val_clip_score"], values["val_frame_consistency"], _ = scorer[0].video(frames, prompts[0])
            else:
                images = []
                for p in paths:
                    with open_image(p) as im:
                        images.append(im.convert("RGB"))
                values["val_clip_score"], _ = scorer[0].score(images, prompts)
    w.acc.wait_for_everyone()
    w.raw_unet.train()
    w.metrics.log(step, values, "val")


class _Window:
    """Loss, step time, data wait and samples since the last log line."""

    def __init__(self):
        self.loss, self.time, self.wait, self.samples = [], 0.0, 0.0, 0

    def add(self, loss: float, seconds: float, wait: float, samples: int) -> None:
        self.loss.append(loss)
        self.time += seconds
        self.wait += wait
        self.samples += samples

    def values(self, lr: float, epoch: int, bucket) -> dict:
        return {"loss": float(np.mean(self.loss)), "lr": lr, "samples_per_s": self.samples / max(self.time, 1e-9),
                "data_wait": self.wait / max(self.time, 1e-9), "epoch": epoch,
                "bucket": f"{bucket.width}x{bucket.height}", "step_losses": self.loss}


def train_loop(config: dict) -> None:
    """One Ray Train worker."""
    import faulthandler

    faulthandler.enable()          # a worker that dies in native code (a signal) leaves its stacks in its log
    _train(build(config), config)


def _train(w: Worker, config: dict) -> None:
    spec = w.spec
    started, first_step = time.time(), w.step
    window = _Window()
    validation, scorer = None, []
    if spec.train.eval_every and config.get("val_index_path"):
        from training.validate import Validation

        validation = Validation(w, config["val_index_path"], _clip_loader)
    it = iter(w.loader)
    tick = time.perf_counter()
    while w.step < spec.train.max_steps:
        wait0 = w.loader.wait_s
        batch = next(it)
        lr = w.optimizer.param_groups[0]["lr"]                 # the rate this step uses
        loss = train_step(w, batch)
        now = time.perf_counter()
        window.add(loss, now - tick, w.loader.wait_s - wait0, len(batch.ids) * w.world)
        tick = now
        step = w.step
        if step % spec.train.log_every == 0 or step == spec.train.max_steps:
            w.metrics.log(step, {**window.values(lr, batch.epoch, w.buckets[batch.bucket]), "world_size": w.world})
            window = _Window()
        if spec.train.sample_every and step % spec.train.sample_every == 0 and step != spec.train.max_steps:
            with full_unet(w) as unet:
                if w.acc.is_main_process:
                    samples(w, step, unet)
            w.acc.wait_for_everyone()
            w.raw_unet.train()
        if validation is not None and (step % spec.train.eval_every == 0 or step == spec.train.max_steps):
            validate(w, step, validation, scorer)
        if step % spec.train.checkpoint_every == 0 or step == spec.train.max_steps:
            checkpoint(w, {"step": step, "loss": loss, "epoch": w.loader.state().epoch})
    w.loader.close()
    if validation is not None:
        validation.close()
    with full_unet(w, ema_weights=True) as unet:
        if w.acc.is_main_process:
            finish(w, first_step, started, unet)
    w.metrics.close()
    w.acc.wait_for_everyone()


__all__ = ["Worker", "build", "step_seed", "train_loop", "train_step"]
