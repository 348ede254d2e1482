"""Rank 0 only: the run's files. Metrics (TensorBoard and ``metrics.jsonl``), samples, the
export (``OUTPUT/final``, or ``OUTPUT/lora`` with its base) and ``summary.json``, written last.
Nothing here makes a collective call: the loop calls it on the main process, between the
collective steps (``step.py``) that every rank enters."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time

import numpy as np

from pipeline.contract import layout, storage
from pipeline.contract.layout import TrainRun
from pipeline.contract.media import write_gif


class Metrics:
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


def samples(w, step: int, unet) -> list[str]:
    """The family's training samples (``Family.training_samples``) as PNGs (an image) or GIFs at the
    run's fps (a video) under OUTPUT/samples, and in TensorBoard (a video's frames side by side)."""
    unet.eval()                               # no dropout (a LoRA's) while sampling; the loop sets train() again
    made = w.family.training_samples(w.ctx, unet, w.loader, w.buckets)
    if not made:
        return []
    folder = TrainRun(w.config["output"]).samples
    storage.makedirs(folder)
    paths = []
    for k, frames in enumerate(made):
        video = len(frames) > 1
        paths.append(storage.join(folder, f"step{step:07d}_{k}.{'gif' if video else 'png'}"))
        with storage.local_target(paths[-1]) as tmp:
            if video:
                write_gif(frames, tmp, w.spec.video.fps)
            else:
                frames[0].save(tmp, format="PNG")
        if video:
            w.metrics.image(f"samples/video_{k}", np.concatenate([np.asarray(f) for f in frames], axis=1), step)
        else:
            w.metrics.image(f"samples/{k}", np.asarray(frames[0]), step)
    return paths


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


def _export_pipeline(w, comps, unet, folder: str) -> str:
    """A diffusers pipeline folder of ``comps`` with ``unet``, plus the run's motion-bucket map (svd)."""
    motion = TrainRun(w.config["output"]).motion   # svd: the map inference must condition with

    def write(tmp: str) -> None:
        w.family.export(comps, unet, tmp)
        if storage.exists(motion):
            storage.download(motion, os.path.join(tmp, TrainRun.MOTION))

    return _publish(folder, write)


def _export_lora(w, unet) -> dict:
    """``OUTPUT/lora`` (the adapter in diffusers' format) and, for the tiny preset, ``OUTPUT/base``
    (the pipeline it applies to, written once); with ``lora.export_fused`` also ``OUTPUT/final``."""
    from training import lora

    out, spec = w.config["output"], w.spec
    base = spec.model.pretrained
    if not base:
        base = TrainRun(out).base
        if not storage.isdir(base):
            fresh = w.family.run_components(spec)           # the preset again, without the adapter
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
                "layers": w.family.lora_layers(spec.lora),
            },
        ),
    )
    return {"lora": folder, "base": base, "adapter_parameters": sum(p.numel() for p in w.trainable)}


def finish(w, first_step: int, started: float, unet) -> None:
    """Rank 0: export ``OUTPUT/final`` with ``unet`` (from ``full_unet(w, ema_weights=True)``) or,
    with LoRA, ``OUTPUT/lora``; the last samples and summary.json."""
    import torch

    out, spec, ema = w.config["output"], w.spec, w.ema
    # the frozen parts were cast to the training dtype: export pristine copies beside the UNet
    pristine = w.comps if w.ctx.weight_dtype == torch.float32 else None
    final, extra = None, {}
    if spec.lora.enabled:
        extra = _export_lora(w, unet)
    if not spec.lora.enabled or spec.lora.export_fused:
        from training.lora import fused

        final = _export_pipeline(w, pristine or w.family.run_components(spec),
                                 fused(unet) if spec.lora.enabled else unet, TrainRun(out).final)
    sample_paths = samples(w, w.step, unet)
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


__all__ = ["Metrics", "finish", "samples"]
