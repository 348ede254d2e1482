"""``winnow train``: SD / SDXL training as a Ray Train job, resumable to the sample.

The driver validates the spec, builds (or reuses) the shard index with one Ray Data pass, checks
the bucket plan, and starts a ``TorchTrainer``. Each worker builds an accelerate ``Accelerator``
(gloo on CPU, NCCL on GPUs; Ray has already formed the process group), the models, AdamW, the
EMA, and its ``BucketLoader`` slice of the global schedule.

Every random draw of step ``s`` on rank ``r`` (VAE posterior sample, noise, offset, timesteps,
caption dropout) comes from a generator seeded by (seed, s, r), and crops are seeded by (seed,
epoch, sample). A checkpoint holds the UNet and the EMA UNet in diffusers format, the optimizer
and learning-rate state, the step and the loader cursor, so a resumed run takes exactly the steps
the uninterrupted one would have. Ray Train keeps the checkpoints under ``OUTPUT/ray/train`` and
restores the newest when the same output is run again (or when a worker group restarts within
``ray.max_failures``). The end of the run exports ``OUTPUT/final``, a complete diffusers
pipeline folder.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

from pipeline.contract import layout
from pipeline.contract.config import ConfigError
from training.checkpoint import CheckpointError, load_json, load_state, load_tensors, save_state
from training.spec import TrainSpec

RUN_NAME = "train"
SPEC_FILE = "train_spec.yaml"
# every top-level name a training run writes: output.overwrite deletes these and nothing else
ENTRIES = [SPEC_FILE, "ray", "final", "final.tmp", "samples", "tensorboard", "metrics.jsonl", layout.SUMMARY_FILE,
           "index.parquet", "_index", "cache"]


def step_seed(seed: int, step: int, rank: int, what: str = "noise") -> int:
    from training.schedule import _rng

    return int(_rng(seed, what, step, rank).integers(0, 2 ** 62))


# ---------------------------------------------------------------- worker side

class _Metrics:
    """Rank 0's TensorBoard writer and metrics.jsonl."""

    def __init__(self, out: str, enabled: bool):
        self.enabled = enabled
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(out, "tensorboard"))
            self.jsonl = open(os.path.join(out, "metrics.jsonl"), "a", encoding="utf-8")

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)) and k != "step":
                self.writer.add_scalar(f"train/{k}", v, step)
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()

    def image(self, tag: str, array: np.ndarray, step: int) -> None:
        if self.enabled:
            self.writer.add_image(tag, array, step, dataformats="HWC")

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()


def _save_checkpoint(folder: str, unet, ema, optimizer, lr_sched, step: int, cursor, extra: dict) -> None:
    unet.save_pretrained(os.path.join(folder, "unet"), safe_serialization=True)
    if ema is not None:
        ema.save_pretrained(os.path.join(folder, "ema_unet"))
    save_state(folder, {"optimizer": optimizer.state_dict(), "lr_scheduler": lr_sched.state_dict(), "step": step})
    with open(os.path.join(folder, "cursor.json"), "w") as fh:
        json.dump(cursor.to_dict(), fh)
    with open(os.path.join(folder, "meta.json"), "w") as fh:
        json.dump({"step": step, **extra}, fh, indent=2)


def restore_checkpoint(folder: str, unet, ema, optimizer, lr_sched):
    """Load a checkpoint ``_save_checkpoint`` wrote into the live objects; returns (step, cursor).

    Only safetensors and JSON are read: a planted pickle is never loaded, and a file that is not
    what winnow writes raises ``CheckpointError`` naming it."""
    from training.schedule import Cursor

    weights = os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")
    try:
        unet.load_state_dict(load_tensors(weights))
    except RuntimeError as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{weights}: does not fit this run's UNet ({str(exc).splitlines()[0]})") from None
    state = load_state(folder)
    try:
        optimizer.load_state_dict(state["optimizer"])
        lr_sched.load_state_dict(state["lr_scheduler"])
        step = int(state["step"])
        cursor = Cursor.from_dict(load_json(os.path.join(folder, "cursor.json")))
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{folder}: state.json or cursor.json is not a valid checkpoint file "
                              f"({type(exc).__name__}: {exc})") from None
    ema_dir = os.path.join(folder, "ema_unet")
    if ema is not None and os.path.isdir(ema_dir):
        config = load_json(os.path.join(ema_dir, "config.json"))
        shadow = load_tensors(os.path.join(ema_dir, "diffusion_pytorch_model.safetensors"))
        names = [n for n, _ in unet.named_parameters()]
        missing = [n for n in names if n not in shadow]
        if missing or not isinstance(config, dict):
            raise CheckpointError(f"{ema_dir}: not a valid EMA checkpoint (missing {missing[:3]})")
        scalars = ("decay", "min_decay", "optimization_step", "update_after_step", "use_ema_warmup", "inv_gamma",
                   "power")
        ema.load_state_dict({**{k: config[k] for k in scalars if k in config},
                             "shadow_params": [shadow[n].float() for n in names]})
    return step, cursor


def _samples(comps, unet, spec: TrainSpec, out: str, step: int, metrics: _Metrics, device, autocast) -> list[str]:
    import torch

    from training.models import build_pipeline

    pipe = build_pipeline(comps, unet).to(device)
    pipe.set_progress_bar_config(disable=True)
    folder = os.path.join(out, "samples")
    os.makedirs(folder, exist_ok=True)
    paths = []
    for k, prompt in enumerate(spec.train.sample_prompts):
        g = torch.Generator("cpu").manual_seed(spec.train.seed + k)
        with autocast():
            img = pipe(prompt, num_inference_steps=spec.train.sample_steps, height=spec.data.resolution,
                       width=spec.data.resolution, generator=g).images[0]
        path = os.path.join(folder, f"step{step:07d}_{k}.png")
        img.save(path)
        metrics.image(f"samples/{k}", np.asarray(img), step)
        paths.append(path)
    return paths


def _components(spec: TrainSpec, scratch: str):
    from training.models import load_components, tiny_components

    if spec.model.pretrained:
        return load_components(spec.model.kind, spec.model.pretrained, spec.model.allow_download,
                               spec.objective.prediction_type)
    return tiny_components(spec.model.kind, spec.model.seed, scratch, spec.objective.prediction_type or "epsilon")


def train_loop(config: dict) -> None:
    """One Ray Train worker."""
    import pyarrow.parquet as pq
    import ray.train
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    from diffusers.training_utils import EMAModel

    from training import objectives as obj
    from training.index import bucket_ids
    from training.loader import BucketLoader
    from training.models import encode_text, export_pipeline
    from training.schedule import Cursor, _rng
    from training.spec import parse

    spec = parse(config["spec"], check_paths=False)
    out = config["output"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    acc = Accelerator(mixed_precision=spec.train.mixed_precision, cpu=not spec.ray.use_gpu)
    device = acc.device
    scratch = tempfile.mkdtemp(prefix="winnow-train-")
    comps = _components(spec, scratch)
    weight_dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[spec.train.mixed_precision]
    vae_dtype = weight_dtype
    if weight_dtype == torch.float16 and comps.vae.config.get("force_upcast", True):
        vae_dtype = torch.float32                          # SD / SDXL VAEs overflow in fp16
    comps.vae.to(device, dtype=vae_dtype).requires_grad_(False).eval()
    for enc in comps.text_encoders:
        enc.to(device, dtype=weight_dtype).requires_grad_(False).eval()
    unet = comps.unet
    unet.set_attn_processor(AttnProcessor2_0())           # PyTorch SDPA
    if spec.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()

    optimizer = torch.optim.AdamW(unet.parameters(), lr=spec.optim.lr, betas=(spec.optim.beta1, spec.optim.beta2),
                                  weight_decay=spec.optim.weight_decay)
    warm = spec.optim.warmup_steps
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    ema = None
    step, cursor = 0, Cursor()
    ckpt = ray.train.get_checkpoint()
    if spec.ema.enabled:
        ema = EMAModel(unet.parameters(), decay=spec.ema.decay, update_after_step=spec.ema.start_step,
                       model_cls=UNet2DConditionModel, model_config=unet.config)
    if ckpt is not None:
        with ckpt.as_directory() as d:
            step, cursor = restore_checkpoint(d, unet, ema, optimizer, lr_sched)
    if ema is not None:
        ema.to(device)
    unet, optimizer = acc.prepare(unet, optimizer)
    raw_unet = acc.unwrap_model(unet)

    index = pq.read_table(config["index_path"])
    table, bucket_of = bucket_ids(index, spec.data.resolution, spec.data.bucket_step, spec.data.max_aspect)
    cache = None
    if config.get("cache_dir"):
        from training.cache import LatentCache

        cache = LatentCache(config["cache_dir"], table, bucket_of)
        empty_context = torch.from_numpy(cache.empty).float().to(device)
        empty_pooled = None if cache.empty_pooled is None else torch.from_numpy(cache.empty_pooled).float().to(device)
    loader = BucketLoader(index, table, bucket_of, cursor, spec.train.batch_size, rank, world, spec.train.seed,
                          spec.data.random_crop, spec.data.workers, spec.data.prefetch, cache=cache)
    ac = comps.noise_scheduler.alphas_cumprod.to(device)
    T = comps.noise_scheduler.config.num_train_timesteps
    pred_type = comps.prediction_type
    scale = comps.vae.config.scaling_factor
    metrics = _Metrics(out, acc.is_main_process)
    if step and acc.is_main_process:
        print(f"winnow train: resumed at step {step} (epoch {cursor.epoch})", flush=True)

    window = {"loss": [], "time": 0.0, "wait": 0.0, "samples": 0}
    started, first_step = time.time(), step
    it = iter(loader)
    tick = time.perf_counter()
    while step < spec.train.max_steps:
        wait0 = loader.wait_s
        batch = next(it)
        g = torch.Generator("cpu").manual_seed(step_seed(spec.train.seed, step, rank))
        keep = obj.caption_keep(len(batch.ids), spec.objective.caption_dropout,
                                _rng(spec.train.seed, "captions", step, rank))
        latent_dtype = weight_dtype if weight_dtype != torch.float16 else torch.float32
        with torch.no_grad():
            if batch.latents is None:
                dist = comps.vae.encode(batch.pixels.to(device, dtype=vae_dtype)).latent_dist
                mean, std = dist.mean, dist.std
                context, pooled = encode_text(comps, [c if k else "" for c, k in zip(batch.captions, keep)], device)
            else:                                   # data.cache: latents and text precomputed
                mean, std = batch.latents[:, 0].to(device), batch.latents[:, 1].to(device)
                mask = torch.from_numpy(keep).to(device)
                context = torch.where(mask[:, None, None], batch.context.to(device), empty_context)
                pooled = None if batch.pooled is None else torch.where(mask[:, None], batch.pooled.to(device), empty_pooled)
            latents = mean + std * torch.randn(mean.shape, generator=g).to(device, mean.dtype)
            latents = (latents * scale).to(latent_dtype)
            context = context.to(weight_dtype)
            pooled = None if pooled is None else pooled.to(weight_dtype)
        noise = obj.offset_noise(torch.randn(latents.shape, generator=g), spec.objective.offset_noise, g).to(device, latents.dtype)
        t = torch.randint(0, T, (latents.shape[0],), generator=g).to(device)
        noisy = obj.add_noise(latents, noise, t, ac)
        target = obj.target(pred_type, latents, noise, t, ac)
        added = None
        if comps.kind == "sdxl":
            added = {"text_embeds": pooled, "time_ids": batch.time_ids.to(device, pooled.dtype)}
        with acc.autocast():
            pred = unet(noisy, t, context, added_cond_kwargs=added).sample
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))
        if spec.objective.min_snr_gamma:
            per_sample = per_sample * obj.min_snr_weights(t, ac, spec.objective.min_snr_gamma, pred_type)
        loss = per_sample.mean()
        acc.backward(loss)
        if spec.optim.max_grad_norm:
            acc.clip_grad_norm_(unet.parameters(), spec.optim.max_grad_norm)
        lr = optimizer.param_groups[0]["lr"]                 # the rate this step used
        optimizer.step()
        lr_sched.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(raw_unet.parameters())
        step += 1
        global_loss = acc.gather(loss.detach()[None]).mean().item()
        now = time.perf_counter()
        window["loss"].append(global_loss)
        window["time"] += now - tick
        window["wait"] += loader.wait_s - wait0
        window["samples"] += len(batch.ids) * world
        tick = now
        if step % spec.train.log_every == 0 or step == spec.train.max_steps:
            metrics.log(step, {"loss": float(np.mean(window["loss"])), "lr": lr,
                               "samples_per_s": window["samples"] / max(window["time"], 1e-9),
                               "data_wait": window["wait"] / max(window["time"], 1e-9),
                               "epoch": batch.epoch, "bucket": f"{table[batch.bucket].width}x{table[batch.bucket].height}",
                               "step_losses": window["loss"]})
            window = {"loss": [], "time": 0.0, "wait": 0.0, "samples": 0}
        if spec.train.sample_every and step % spec.train.sample_every == 0 and step != spec.train.max_steps:
            if acc.is_main_process:
                _samples(comps, raw_unet, spec, out, step, metrics, device, acc.autocast)
            acc.wait_for_everyone()
            raw_unet.train()
        if step % spec.train.checkpoint_every == 0 or step == spec.train.max_steps:
            report = {"step": step, "loss": global_loss, "epoch": loader.state().epoch}
            if acc.is_main_process:
                folder = tempfile.mkdtemp(prefix="winnow-ckpt-")
                _save_checkpoint(folder, raw_unet, ema, optimizer, lr_sched, step, loader.state(),
                                 {"epoch": loader.state().epoch, "world_size": world, "fingerprint": config["fingerprint"]})
                ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(folder),
                                 checkpoint_dir_name=f"checkpoint_{step:07d}")
                shutil.rmtree(folder, ignore_errors=True)
            else:
                ray.train.report(report)
    loader.close()

    if acc.is_main_process:
        final = os.path.join(out, "final")
        if ema is not None:
            ema.store(raw_unet.parameters())
            ema.copy_to(raw_unet.parameters())
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        # the frozen parts were cast to the training dtype: export pristine copies beside the UNet
        export_pipeline(comps if weight_dtype == torch.float32 else _components(spec, scratch), raw_unet, tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        sample_paths = _samples(comps, raw_unet, spec, out, step, metrics, device, acc.autocast) if spec.train.sample_prompts else []
        if ema is not None:
            ema.restore(raw_unet.parameters())
        wall = time.time() - started
        summary = {"steps": step, "steps_this_run": step - first_step, "resumed_from": first_step,
                   "epoch": loader.state().epoch, "global_batch": spec.train.batch_size * world,
                   "world_size": world, "samples_this_run": (step - first_step) * spec.train.batch_size * world,
                   "wall_s": round(wall, 2), "data_wait_s": round(loader.wait_s, 3),
                   "final": final, "ema": ema is not None, "samples": sample_paths,
                   "prediction_type": pred_type, "kind": comps.kind,
                   "distributed": str(acc.distributed_type), "num_processes": acc.num_processes}
        with open(os.path.join(out, layout.SUMMARY_FILE), "w") as fh:
            json.dump(summary, fh, indent=2)
    metrics.close()
    acc.wait_for_everyone()
    shutil.rmtree(scratch, ignore_errors=True)


# ---------------------------------------------------------------- driver side

@dataclass
class Plan:
    samples: int
    buckets: dict[str, int]
    global_batch: int
    steps_per_epoch: int
    starved: int                    # samples in buckets smaller than one global batch
    carried_per_epoch: int
    index_path: str = ""
    notes: list[str] = field(default_factory=list)
    index: object = field(default=None, repr=False)         # the pyarrow index the plan was made from
    table: list = field(default_factory=list, repr=False)   # its bucket table ...
    bucket_of: object = field(default=None, repr=False)     # ... and every sample's bucket


def prepare_output(spec: TrainSpec) -> None:
    """Create the run folder, or check that it belongs to this same spec (resume)."""
    from pipeline.contract.layout import claim_output

    out = spec.output.path
    claim_output(out, os.path.join(out, SPEC_FILE), spec.fingerprint(), spec.to_dict(), spec.output.overwrite,
                 "training run", "data, model, objective, optim, ema or train", ENTRIES, "train",
                 {**{f"data.shards[{i}]": p for i, p in enumerate(spec.data.shards)}, "data.selection": spec.data.selection})


def plan(spec: TrainSpec, log=sys.stderr) -> Plan:
    """Index the shard sets (one Ray Data pass, cached) and check the bucket plan."""
    import pyarrow.parquet as pq

    from pipeline.contract.layout import atomic_write, table_bytes
    from training.index import bucket_ids, load_index

    index = load_index(spec.data.shards, os.path.join(spec.output.path, "_index"), log, spec.data.selection)
    path = os.path.join(spec.output.path, "index.parquet")
    if not os.path.exists(path) or pq.read_metadata(path).num_rows != index.num_rows or \
            not pq.read_table(path).equals(index):
        atomic_write(path, table_bytes(index))
    table, bucket_of = bucket_ids(index, spec.data.resolution, spec.data.bucket_step, spec.data.max_aspect)
    g = spec.train.batch_size * spec.ray.num_workers
    counts = np.bincount(bucket_of, minlength=len(table))
    steps = int(sum(c // g for c in counts))
    starved = int(sum(c for c in counts if c < g))
    p = Plan(index.num_rows, {f"{table[i].width}x{table[i].height}": int(c) for i, c in enumerate(counts) if c},
             g, steps, starved, int(sum(c % g for c in counts if c >= g)), path,
             index=index, table=table, bucket_of=bucket_of)
    if steps == 0:
        raise ConfigError(f"train.batch_size x ray.num_workers = {g} is more than any bucket holds "
                          f"(largest: {counts.max()} of {index.num_rows} samples); lower the batch size or the "
                          f"worker count, or lower data.max_aspect so fewer, fuller buckets form")
    if starved:
        p.notes.append(f"{starved} samples sit in buckets smaller than one global batch ({g}) and are never trained "
                       f"on; lower train.batch_size or data.max_aspect")
    return p


def format_plan(spec: TrainSpec, p: Plan) -> str:
    lines = [f"winnow train: {p.samples} samples, {len(p.buckets)} buckets at base {spec.data.resolution}, "
             f"global batch {p.global_batch} ({spec.train.batch_size} x {spec.ray.num_workers} workers), "
             f"{p.steps_per_epoch} steps per epoch ({p.carried_per_epoch} samples carried to the next epoch)",
             "  buckets  " + ", ".join(f"{k}: {v}" for k, v in sorted(p.buckets.items(), key=lambda kv: -kv[1]))]
    lines += [f"  note: {n}" for n in p.notes]
    return "\n".join(lines)


@dataclass
class TrainResult:
    output: str
    summary: dict
    metrics: list[dict]


def format_summary(r: TrainResult) -> str:
    s = r.summary
    losses = [m["loss"] for m in r.metrics]
    rates = [m["samples_per_s"] for m in r.metrics if m["step"] > s["resumed_from"]]
    waits = [m["data_wait"] for m in r.metrics if m["step"] > s["resumed_from"]]
    lines = [f"winnow train: {r.output}",
             f"  steps      {s['steps']} ({s['steps_this_run']} this run"
             + (f", resumed from step {s['resumed_from']})" if s["resumed_from"] else ")"),
             f"  epoch      {s['epoch']}   global batch {s['global_batch']} on {s['world_size']} workers",
             f"  loss       first logged {losses[0]:.4f}, last {losses[-1]:.4f}" if losses else "  loss       (none logged)",
             f"  throughput {np.mean(rates):.1f} samples/s, data wait {100 * np.mean(waits):.1f} % of step time"
             if rates else "  throughput (no steps this run)",
             f"  wall       {s['wall_s']:.1f} s in the workers",
             f"  final      {s['final']}  (diffusers pipeline{', EMA weights' if s['ema'] else ''})",
             f"  logs       tensorboard --logdir {os.path.join(r.output, 'tensorboard')}"]
    if s.get("samples"):
        lines.append(f"  samples    {', '.join(s['samples'])}")
    return "\n".join(lines)


def init_ray(spec: TrainSpec):
    from pipeline import adapter

    adapter.connect(spec.ray.address, spec.ray.num_cpus)
    adapter.configure(no_progress_timeout_s=900, progress_bars=False, has_actor_stages=spec.data.cache)


class _ProgressBar:
    """The driver's view of a running job: a bar to ``max_steps`` with the loss and samples/s, read
    from rank 0's ``metrics.jsonl`` (the workers' own output goes to Ray's logs)."""

    def __init__(self, path: str, total: int, log, every_s: float = 1.0):
        import threading

        from tqdm.auto import tqdm

        self.path, self.every_s = path, every_s
        self.offset = os.path.getsize(path) if os.path.exists(path) else 0
        self.bar = tqdm(total=total, desc="train", unit="step", file=log, disable=log is None, dynamic_ncols=True)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        try:
            with open(self.path, encoding="utf-8") as fh:
                fh.seek(self.offset)
                lines = fh.readlines()
        except OSError:
            return
        for line in lines:
            if not line.endswith("\n"):
                break                                       # a line rank 0 is still writing
            self.offset += len(line.encode("utf-8"))
            try:
                m = json.loads(line)
            except json.JSONDecodeError:
                continue
            self.bar.n = int(m.get("step", self.bar.n))
            self.bar.set_postfix(loss=f"{m.get('loss', float('nan')):.4f}",
                                 samples_s=f"{m.get('samples_per_s', 0):.1f}", refresh=False)
            self.bar.refresh()

    def _loop(self) -> None:
        while not self.stop.wait(self.every_s):
            self._poll()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self._poll()
        self.bar.close()


def run(spec: TrainSpec, log=sys.stderr) -> TrainResult:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    prepare_output(spec)
    init_ray(spec)
    p = plan(spec, log)
    if log:
        print(format_plan(spec, p), file=log, flush=True)
    cache_dir = ""
    if spec.data.cache:
        from training.cache import build_cache

        started = time.time()
        cache_dir = build_cache(spec, p.index, p.table, p.bucket_of, log)
        if log:
            print(f"latent cache: {p.samples} samples in {cache_dir} ({time.time() - started:.1f} s)", file=log)
    out = os.path.abspath(spec.output.path)
    resources = {"CPU": spec.ray.cpus_per_worker}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"spec": spec.to_dict(), "output": out, "index_path": os.path.abspath(p.index_path),
                           "cache_dir": cache_dir,
                           "fingerprint": spec.fingerprint()},
        scaling_config=ScalingConfig(num_workers=spec.ray.num_workers, use_gpu=spec.ray.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=RUN_NAME, storage_path=os.path.join(out, "ray"),
                             failure_config=FailureConfig(max_failures=spec.ray.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=spec.train.keep_checkpoints)))
    progress = _ProgressBar(os.path.join(out, "metrics.jsonl"), spec.train.max_steps, log)
    try:
        trainer.fit()
    except Exception as exc:  # noqa: BLE001 - a refused checkpoint is the user's to fix: say which file
        import re

        found = re.findall(r"CheckpointError: ([^\n]+)", str(exc))     # the worker's own error line
        if found:
            raise CheckpointError(found[-1]) from None
        raise
    finally:
        progress.close()
    with open(os.path.join(out, layout.SUMMARY_FILE)) as fh:
        summary = json.load(fh)
    metrics = []
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        for line in fh:
            metrics.append(json.loads(line))
    # a killed run logs steps it never checkpointed; keep the last record of every step
    by_step = {m["step"]: m for m in metrics}
    return TrainResult(out, summary, [by_step[k] for k in sorted(by_step)])


__all__ = ["Plan", "TrainResult", "format_plan", "format_summary", "plan", "prepare_output", "run", "train_loop"]
