"""Every rank: the training loop. Steps, logs, samples, validation and checkpoints at their
intervals, then the export; each collective call is made by every rank in the same order, and
rank-0 work (``rank0.py``) sits between them."""
from __future__ import annotations

import time

import numpy as np

from training.worker.build import build
from training.worker.rank0 import finish, samples
from training.worker.state import Worker
from training.worker.step import checkpoint, full_unet, train_step


class _Window:
    """Loss, step time, data wait and samples since the last log line."""

    def __init__(self):
        self.loss: list[float] = []
        self.time = self.wait = 0.0
        self.samples = 0

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
    run(build(config))


def run(w: Worker) -> None:
    spec = w.spec
    started, first_step = time.time(), w.step
    window = _Window()
    validation, scorer = None, []
    if spec.train.eval_every and w.config.get("val_index_path"):
        from training.worker.validation import Validation

        validation = Validation(w, w.config["val_index_path"])
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
            from training.worker.validation import validate

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


__all__ = ["run", "train_loop"]
