"""The worker's state: one typed object, its fields set in ``build`` (``step`` advances in
``step.optimize`` alone), and what a checkpoint holds of it.

Every random draw of step ``s`` on rank ``r`` (VAE posterior sample, noise, offset, timesteps,
caption dropout, LoRA dropout) comes from a generator seeded by (seed, s, r), and crops are seeded
by (seed, epoch, sample), so a resumed run takes exactly the steps the uninterrupted one would have.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from training import families
from training.families.base import StepContext
from training.schedule import seeded_rng
from training.train_spec import TrainSpec


def step_seed(seed: int, step: int, rank: int, what: str = "noise") -> int:
    return int(seeded_rng(seed, what, step, rank).integers(0, 2 ** 62))


@dataclass
class Worker:
    """Everything one worker trains with."""

    spec: TrainSpec
    config: dict                     # the driver's train_loop_config (output, index, cache, fingerprint)
    acc: object                      # accelerate's Accelerator
    family: families.Family
    ctx: StepContext                 # what the family's losses and samplers use
    unet: object                     # as accelerate prepared it
    raw_unet: object                 # the module itself
    optimizer: object
    lr_sched: object
    ema: object
    loader: object
    buckets: list
    metrics: object                  # rank0.Metrics (writes on the main process only)
    rank: int = 0
    world: int = 1
    step: int = 0
    trainable: list = field(default_factory=list)   # what the optimizer and EMA see: the UNet, or its LoRA adapter

    @property
    def comps(self):
        return self.ctx.comps

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


__all__ = ["Worker", "states_of", "step_seed"]
