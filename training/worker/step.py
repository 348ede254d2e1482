"""Every rank: one optimizer step (the family's loss), the whole UNet for rank-0 work, and the
checkpoint report. Every function here is entered by every rank in the same order: each holds a
collective call (the loss gather, FSDP's gather, Ray Train's report)."""
from __future__ import annotations

import contextlib
import shutil
import tempfile

from training.checkpoint import save_checkpoint
from training.objectives import caption_keep
from training.schedule import seeded_rng
from training.worker.state import Worker, step_seed


def optimize(w: Worker, loss) -> float:
    """Backward, clip, step, schedule, EMA, ``w.step + 1``; the loss averaged over every rank."""
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


def seed_dropout(w: Worker) -> None:
    """LoRA dropout draws from torch's global generator: seed it by (seed, step, rank) so a resumed
    run drops what the uninterrupted one would have."""
    if w.spec.lora.enabled and w.spec.lora.dropout:
        import torch

        torch.manual_seed(step_seed(w.spec.train.seed, w.step, w.rank, "dropout"))


def train_step(w: Worker, batch) -> float:
    """One optimizer step on ``batch`` with the family's loss (``Family.step_loss``): noise from
    (seed, step, rank), each classifier-free-guidance drop from its own (seed, name, step, rank)
    stream. Returns the loss averaged over every rank."""
    import torch

    spec = w.spec
    g = torch.Generator("cpu").manual_seed(step_seed(spec.train.seed, w.step, w.rank))
    n = len(batch.ids)

    def keep(name: str, p: float) -> torch.Tensor:
        return torch.from_numpy(caption_keep(n, p, seeded_rng(spec.train.seed, name, w.step, w.rank)))

    seed_dropout(w)
    return optimize(w, w.family.step_loss(w.ctx, batch, g, keep, w.unet).mean())


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


__all__ = ["checkpoint", "full_unet", "optimize", "seed_dropout", "train_step"]
