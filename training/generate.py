"""A trained run's model, loaded for sampling (``winnow eval --run``): its exported pipeline, its
LoRA on the base it was trained from, or one of its checkpoints.

Which weights, in order:

* ``--checkpoint DIR`` (``OUTPUT/ray/train/checkpoint_NNNNNNN``): the run's base model (its
  ``model.pretrained``, or the tiny preset of its seed) with the checkpoint's UNet or adapter, the
  EMA weights when the checkpoint holds them. Only safetensors and JSON are read.
* ``OUTPUT/final`` (a full run, or a LoRA run with ``export_fused``), else
* ``OUTPUT/lora`` on ``OUTPUT/base`` (or ``model.pretrained``).

Images are sampled through the family's diffusers pipeline; videos through the family's own
sampler (``sample_videos``: the SVD pipeline from a conditioning frame, or winnow's text-to-video
Euler loop), each prompt with its own seeded generator so a prompt's output does not depend on
which prompts came before it.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import torch

from pipeline.contract.config import ConfigError
from pipeline.contract.layout import TrainRun


@dataclass
class RunModel:
    spec: object          # the run's TrainSpec
    family: object
    comps: object         # Components, the UNet among them carrying any adapter
    source: str           # what was loaded, in words


def run_spec(run: str):
    import yaml

    from pipeline.contract import storage
    from training import train_spec

    path = TrainRun(run).spec
    if not storage.isfile(path):
        raise ConfigError(f"--run: {run!r} has no {TrainRun.SPEC}; give a `winnow train` output folder")
    data = yaml.safe_load(storage.read_text(path))
    data.pop("fingerprint", None)
    return train_spec.parse(data, check_paths=False)


def weights_of(run: str, checkpoint: str | None = None) -> str:
    """Which weights ``load_run`` would take, or a ConfigError saying what is missing."""
    from pipeline.contract import storage

    if checkpoint:
        if not storage.isfile(storage.join(checkpoint, "state.json")):
            raise ConfigError(f"--checkpoint: {checkpoint!r} has no state.json; give a checkpoint folder "
                              f"(OUTPUT/ray/train/checkpoint_NNNNNNN)")
        return "checkpoint"
    if storage.isfile(storage.join(TrainRun(run).final, "model_index.json")):
        return "final"
    if storage.isfile(storage.join(TrainRun(run).lora, "pytorch_lora_weights.safetensors")):
        return "lora"
    raise ConfigError(f"--run: {run!r} has neither final/ nor lora/ (has the run finished?); give --checkpoint "
                      f"{storage.join(TrainRun(run).checkpoints, 'checkpoint_NNNNNNN')} to evaluate an unfinished run")


def _base(spec, run: str) -> str:

    return spec.model.pretrained or TrainRun(run).base


def load_run(run: str, checkpoint: str | None = None, scratch: str | None = None) -> RunModel:
    from pipeline.contract import storage
    from training import families
    from training.lora import load_adapter

    spec = run_spec(run)
    family = families.get(spec.model.kind)
    what = weights_of(run, checkpoint)
    m = spec.model
    if what == "final":        # a run on a store: its pipeline is read from this node's copy
        with storage.local_copy(TrainRun(run).final) as final:
            return RunModel(spec, family, family.load(final), f"{run}/final")
    if what == "lora":
        base = _base(spec, run)
        if not (m.pretrained or storage.isdir(base)):
            raise ConfigError(f"--run: the LoRA's base {base!r} is missing")
        with storage.local_copy(base) as local_base, storage.local_copy(TrainRun(run).lora) as adapter:
            comps = family.load(local_base)
            load_adapter(comps.unet, adapter)
        return RunModel(spec, family, comps, f"{run}/lora on {base}")
    with storage.local_copy(checkpoint) as local:
        return _load_checkpoint(spec, family, local, checkpoint, scratch)


def _load_checkpoint(spec, family, checkpoint: str, name: str, scratch: str | None) -> RunModel:
    import tempfile

    from training.checkpoint import load_json, load_state, load_tensors
    from training.lora import AdapterWeights, add_lora

    m = spec.model
    own = scratch is None
    scratch = scratch or tempfile.mkdtemp(prefix="winnow-eval-")
    try:                       # the preset's tokenizer passes through it and is read into memory
        comps = family.components(m.pretrained, m.allow_download, m.seed, scratch, spec.objective.prediction_type)
    finally:
        if own:
            shutil.rmtree(scratch, ignore_errors=True)
    if spec.lora.enabled:
        add_lora(comps.unet, spec.lora, family.lora_layers(spec.lora), m.seed)
        state = load_state(checkpoint)
        AdapterWeights(comps.unet).load_state_dict(state["adapter"])
        ema = state.get("ema_adapter")
        if ema:                                   # the shadow weights, in the adapter's parameter order
            from training.lora import adapter_params

            with torch.no_grad():
                for p, s in zip(adapter_params(comps.unet).values(), ema["shadow_params"], strict=True):
                    p.copy_(s)
    else:
        sub = "ema_unet" if os.path.isdir(os.path.join(checkpoint, "ema_unet")) else "unet"
        weights = load_tensors(os.path.join(checkpoint, sub, "diffusion_pytorch_model.safetensors"))
        comps.unet.load_state_dict(weights)
    meta = os.path.join(checkpoint, "meta.json")
    step = load_json(meta).get("step") if os.path.isfile(meta) else "?"
    return RunModel(spec, family, comps, f"{name} (step {step})")


def _eval_mode(comps) -> None:
    """Inference mode for every part (a preset built in code starts in training mode, where a LoRA's
    dropout would still drop)."""
    for part in (comps.unet, comps.vae, *comps.encoders):
        part.eval()


def generate(m: RunModel, prompts: list[str], frames: list | None, steps: int, guidance: float,
             size: int | None = None, num_frames: int | None = None, seed: int = 0, device: str = "cpu",
             progress=None) -> list[list]:
    """One list of PIL frames per prompt (an image: one frame), sampled by the run's family
    (``Family.sample``), every part in inference mode."""
    _eval_mode(m.comps)
    return m.family.sample(m.comps, m.spec, prompts, frames, steps, guidance, size, num_frames, seed, device,
                           progress)


def interp_frames(spec) -> tuple[int, int, int]:
    """(frames F, height, width) an interpolation run samples at: its first video bucket's."""
    first = next(iter(spec.video.buckets))
    height, width = (int(x) for x in first.split("x"))
    return int(next(iter(spec.video.buckets[first]))), height, width


def check_factor(spec, factor: int) -> int:
    """The frames the model predicts between two given ones are F - 2 at F - 1 steps of the run's
    rate; a ``factor`` fills each gap with ``factor - 1`` of them, evenly spaced: F - 1 must be a
    multiple of it."""
    frames = interp_frames(spec)[0]
    if factor < 2 or (frames - 1) % factor:
        fits = [k for k in range(2, frames) if (frames - 1) % k == 0]
        raise ConfigError(f"--factor {factor}: the run predicts {frames - 2} frames between two, so it fills a gap "
                          f"{' or '.join(f'{k}x' for k in fits)}")
    return (frames - 1) // factor


def interpolate_pair(m: RunModel, first, last, factor: int, steps: int, seed: int, device: str = "cpu",
                     guidance: float = 1.0) -> list:
    """The ``factor - 1`` frames between two PIL frames (resized to the run's bucket)."""
    _eval_mode(m.comps)
    frames, height, width = interp_frames(m.spec)
    stride = check_factor(m.spec, factor)
    a, b = (im.convert("RGB").resize((width, height)) for im in (first, last))
    between = m.family.interpolate(m.comps, None, a, b, frames, steps, m.spec.video.fps, seed, device,
                                   guidance=guidance)
    return [between[k * stride - 1] for k in range(1, factor)]


def interpolate_video(m: RunModel, frames: list, factor: int = 4, steps: int = 25, seed: int = 0, device: str = "cpu",
                      guidance: float = 1.0, progress=None) -> list:
    """A video's frames (PIL) with ``factor - 1`` new frames in every gap: N frames at r fps in,
    (N - 1) x factor + 1 out at factor x r fps, at the run's bucket size. The frames given pass
    through unchanged (resized); gap k is seeded ``seed + k``."""
    if not m.family.interpolates():
        raise ConfigError(f"--run: model.kind {m.spec.model.kind} does not interpolate; train an svd_interp stage")
    _, height, width = interp_frames(m.spec)
    check_factor(m.spec, factor)
    given = [im.convert("RGB").resize((width, height)) for im in frames]
    out = given[:1]
    for k in range(len(given) - 1):
        out += interpolate_pair(m, given[k], given[k + 1], factor, steps, seed + k, device, guidance)
        out.append(given[k + 1])
        if progress:
            progress()
    return out


__all__ = ["RunModel", "check_factor", "generate", "interp_frames", "interpolate_pair", "interpolate_video",
           "load_run", "run_spec", "weights_of"]
