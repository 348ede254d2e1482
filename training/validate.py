"""Validation during training (``train.eval_every``): a loss on held-out samples that is the same
computation at every pass, and the CLIP score of the sample images.

* The split (``holdout``): a sample is held out when a hash of (seed, key) falls below
  ``train.eval_fraction`` (at most ``train.eval_max``, the lowest hashes), so whether a sample is
  held out depends on its key alone, not on the order or the other samples. The driver writes the
  held-out rows to ``OUTPUT/val_index.parquet`` and trains on the rest: they are never trained on.
* The loss (``training.worker.validation.Validation``): every held-out sample, centre-cropped to its bucket, encoded
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


__all__ = ["fixed_timesteps", "holdout"]
