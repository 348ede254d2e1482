"""Every rank: build the worker. An accelerate ``Accelerator`` (gloo on CPU, NCCL on GPUs; Ray has
already formed the process group), the family's components with the frozen parts on the device,
AdamW, the EMA, the restored checkpoint (or an earlier run's AdamW moments), FSDP sharding after
the unsharded restore, and this rank's slice of the global schedule from the family's loader."""
from __future__ import annotations

from pipeline.contract import layout
from training import families
from training.checkpoint import restore_checkpoint
from training.families.base import StepContext
from training.schedule import Cursor
from training.train_spec import TrainSpec
from training.worker.rank0 import Metrics
from training.worker.state import Worker, states_of


def _frozen_models(spec: TrainSpec, comps, device):
    """Move the VAE and the conditioning encoders to the device, frozen; returns (weight dtype, VAE dtype)."""
    import torch

    weight_dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[spec.train.mixed_precision]
    vae_dtype = weight_dtype
    if weight_dtype == torch.float16 and comps.vae.config.get("force_upcast", True):
        vae_dtype = torch.float32                          # SD / SDXL VAEs overflow in fp16
    comps.vae.to(device, dtype=vae_dtype).requires_grad_(False).eval()
    for enc in comps.encoders:
        enc.to(device, dtype=weight_dtype).requires_grad_(False).eval()
    return weight_dtype, vae_dtype


def optimizer_for(spec: TrainSpec, params):
    """AdamW and its warm-up schedule."""
    import torch

    optimizer = torch.optim.AdamW(params, lr=spec.optim.lr, betas=(spec.optim.beta1, spec.optim.beta2),
                                  weight_decay=spec.optim.weight_decay)
    warm = spec.optim.warmup_steps
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    return optimizer, lr_sched


def build(config: dict) -> Worker:
    """Accelerator, models, optimizer, EMA, the restored checkpoint (if any) and the loader."""
    import ray.train
    from accelerate import Accelerator
    from diffusers.models.attention_processor import AttnProcessor2_0
    from diffusers.training_utils import EMAModel

    from training.train_spec import parse

    spec = parse(config["spec"], check_paths=False)
    family = families.get(spec.model.kind)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    acc = Accelerator(mixed_precision=spec.train.mixed_precision, cpu=not spec.ray.use_gpu)
    comps = family.run_components(spec)
    weight_dtype, vae_dtype = _frozen_models(spec, comps, acc.device)
    unet = comps.unet
    unet.set_attn_processor(AttnProcessor2_0())           # PyTorch SDPA
    if spec.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    trainable = list(unet.parameters())
    if spec.lora.enabled:                                 # only the adapter trains
        from training.lora import add_lora

        trainable = add_lora(unet, spec.lora, family.lora_layers(spec.lora), spec.model.seed)
    unet.train()
    optimizer, lr_sched = optimizer_for(spec, trainable)
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
        optimizer, lr_sched = shard_training(unet, optimizer, lr_sched, ema,
                                             lambda m: optimizer_for(spec, m.parameters()))
        trainable = list(unet.parameters())               # the shards replaced the parameters (no LoRA with FSDP)
        prepared, optimizer = unet, acc.prepare(optimizer)   # no DDP wrapper: FSDP reduces the gradients
    else:
        prepared, optimizer = acc.prepare(unet, optimizer)
    index = layout.read_table(config["index_path"])
    loader, buckets, empty = family.loader(spec, config, index, cursor, rank, world, acc.device)
    metrics = Metrics(config["output"], acc.is_main_process)
    if step and acc.is_main_process:
        print(f"winnow train: resumed at step {step} (epoch {cursor.epoch})", flush=True)
    step_ctx = StepContext(spec, comps, acc.device, weight_dtype, vae_dtype, acc.autocast, empty)
    return Worker(spec, config, acc, family, step_ctx, prepared, acc.unwrap_model(prepared), optimizer, lr_sched, ema,
                  loader, buckets, metrics, rank, world, step, trainable)


__all__ = ["build", "optimizer_for"]
