"""Validation during training (``train.eval_every``): a loss on held-out samples that is the same
computation at every pass, and the CLIP score of the sample images.

* The split (``holdout``): a sample is held out when a hash of (seed, key) falls below
  ``train.eval_fraction`` (at most ``train.eval_max``, the lowest hashes), so whether a sample is
  held out depends on its key alone, not on the order or the other samples. The driver writes the
  held-out rows to ``OUTPUT/val_index.parquet`` and trains on the rest: they are never trained on.
* The loss (``Validation.loss``): every held-out sample, centre-cropped to its bucket, encoded
  with the VAE posterior sample, noise and (video) sigmas drawn from generators seeded by (seed,
  batch), captions all kept. Image models are scored at fixed timesteps (the midpoints of eight
  equal slices of the schedule) and the loss is the plain mean squared error of the model's
  target, averaged over samples and timesteps; video models use their EDM loss with the same
  seeded sigmas each pass. Ranks split the batches and the sums are reduced, so every rank ends
  with the same number.
"""
from __future__ import annotations

import hashlib

import numpy as np

TIMESTEP_SLICES = 8


def holdout(keys: list[str], seed: int, fraction: float, cap: int) -> np.ndarray:
    """Boolean mask of the held-out keys."""
    u = np.array([int.from_bytes(hashlib.blake2b(f"{seed}/{k}".encode(), digest_size=8).digest(), "big") / 2 ** 64
                  for k in keys], np.float64)
    held = u < fraction
    if held.sum() > cap:
        held[:] = False
        held[np.argsort(u, kind="stable")[:cap]] = True
    return held


def fixed_timesteps(num_train_timesteps: int) -> list[int]:
    step = num_train_timesteps / TIMESTEP_SLICES
    return [int(step * (k + 0.5)) for k in range(TIMESTEP_SLICES)]


class Validation:
    """The held-out set as batches (one bucket per batch, none dropped), this rank's share of them."""

    def __init__(self, w, path: str, clip_loader):
        from pipeline.contract.layout import read_table
        from training.index import bucket_ids
        from training.loader import BucketLoader
        from training.schedule import Cursor

        spec = w.spec
        index = read_table(path)
        if w.family.clips:
            loader, buckets, _ = clip_loader(spec, w.config, index, Cursor(), 0, 1)
            sizes = [b.batch for b in buckets]
        else:
            buckets, bucket_of = bucket_ids(index, spec.data.resolution, spec.data.bucket_step, spec.data.max_aspect)
            loader = BucketLoader(index, buckets, bucket_of, Cursor(), spec.train.batch_size, 0, 1, spec.train.seed,
                                  False, 1, 1)
            sizes = [spec.train.batch_size] * len(buckets)
        loader.random_crop = False                                   # centre crops: the same pixels every pass
        self.loader = loader
        batches = []
        for b, size in enumerate(sizes):
            ids = [int(i) for i in np.flatnonzero(np.asarray(loader.bucket_of) == b)]
            batches += [ids[k:k + size] for k in range(0, len(ids), size)]
        self.samples = sum(len(b) for b in batches)
        self.batches = list(enumerate(batches))[w.rank::w.world]

    def loss(self, w, conditioning) -> float:
        """Mean held-out loss, the same on every rank (NaN when nothing is held out); ``conditioning``
        is the training step's (latents, context, pooled) encoder."""
        import torch

        from training.schedule import Cursor, seeded_rng

        sums = torch.zeros(2, dtype=torch.float64, device=w.acc.device)
        unet = w.raw_unet
        was_training = unet.training
        unet.eval()
        with torch.no_grad():
            for k, ids in self.batches:
                batch = self.loader._assemble(Cursor(), ids, [self.loader._sample(i, 0) for i in ids])
                g = torch.Generator("cpu").manual_seed(
                    int(seeded_rng(w.spec.train.seed, "validation", k).integers(0, 2**62))
                )
                per = self._video(w, batch, g) if w.family.clips else self._image(w, batch, g, conditioning)
                sums += torch.stack([per.double().sum(), torch.tensor(float(per.numel()), dtype=torch.float64,
                                                                      device=per.device)]).to(sums.device)
        unet.train(was_training)
        total = w.acc.reduce(sums, "sum")
        return float(total[0] / total[1]) if float(total[1]) else float("nan")

    @staticmethod
    def _image(w, batch, g, conditioning):
        import torch
        import torch.nn.functional as F

        from training import objectives as obj

        device = w.acc.device
        keep = np.ones(len(batch.ids), bool)
        latents, context, pooled = conditioning(w, batch, keep, g)
        noise = torch.randn(latents.shape, generator=g).to(device, latents.dtype)
        ac = w.comps.noise_scheduler.alphas_cumprod.to(device)
        added = w.family.unet_conditions(pooled, batch.time_ids, device)
        out = []
        for t in fixed_timesteps(w.comps.noise_scheduler.config.num_train_timesteps):
            tt = torch.full((latents.shape[0],), t, device=device, dtype=torch.long)
            with w.acc.autocast():
                pred = w.raw_unet(obj.add_noise(latents, noise, tt, ac), tt, context, added_cond_kwargs=added).sample
            target = obj.target(w.comps.prediction_type, latents, noise, tt, ac)
            out.append(F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim))))
        return torch.stack(out, dim=1)                             # (B, timesteps)

    @staticmethod
    def _video(w, batch, g):
        import torch

        n = len(batch.ids)
        with w.acc.autocast():
            return w.family.step_loss(w.comps, batch.frames.to(w.acc.device, w.vae_dtype), batch, w.spec, g,
                                      lambda name, p: torch.ones(n, dtype=torch.bool), w.raw_unet)

    def close(self) -> None:
        self.loader.close()


__all__ = ["Validation", "fixed_timesteps", "holdout"]
