"""The diffusion training math, one small function per piece, each tested against diffusers.

* forward process ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps`` (Ho et al., 2020) on SD's
  "scaled linear" beta schedule;
* targets: epsilon, or velocity ``v = sqrt(a_t) eps - sqrt(1 - a_t) x_0`` (Salimans & Ho, 2022;
  SD 2's 768 model);
* offset noise (Guttenberg, 2023; SDXL used 0.05): a per-channel constant added to the noise;
* min-SNR-gamma loss weights (Hang et al., 2023);
* SDXL's micro-conditioning ids, in diffusers' order: original size (h, w), crop top-left
  (top, left), target size (h, w) (Podell et al., 2023);
* caption dropout for classifier-free guidance (Ho & Salimans, 2022).
"""
from __future__ import annotations

import numpy as np
import torch


def alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                   schedule: str = "scaled_linear") -> torch.Tensor:
    """Cumulative product of (1 - beta) for SD's schedules (float64 for exactness)."""
    if schedule == "scaled_linear":
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float64) ** 2
    elif schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    else:
        raise ValueError(f"unknown beta schedule {schedule!r}; use scaled_linear or linear")
    return torch.cumprod(1.0 - betas, dim=0)


def _coef(ac: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a = ac.to(like.device)[t].to(like.dtype)
    shape = (-1,) + (1,) * (like.ndim - 1)
    return a.sqrt().reshape(shape), (1 - a).sqrt().reshape(shape)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, ac: torch.Tensor) -> torch.Tensor:
    sa, s1a = _coef(ac, t, x0)
    return sa * x0 + s1a * noise


def velocity(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, ac: torch.Tensor) -> torch.Tensor:
    sa, s1a = _coef(ac, t, x0)
    return sa * noise - s1a * x0


def target(prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, ac: torch.Tensor) -> torch.Tensor:
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return velocity(x0, noise, t, ac)
    raise ValueError(f"prediction_type {prediction_type!r}: use epsilon or v_prediction")


def offset_noise(noise: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise plus ``strength`` x a per-sample, per-channel constant (lets the model learn overall
    brightness; SDXL trained with 0.05)."""
    if not strength:
        return noise
    shape = noise.shape[:2] + (1,) * (noise.ndim - 2)
    return noise + strength * torch.randn(shape, generator=generator, device=noise.device, dtype=noise.dtype)


def snr(t: torch.Tensor, ac: torch.Tensor) -> torch.Tensor:
    a = ac.to(t.device)[t]
    return a / (1 - a)


def min_snr_weights(t: torch.Tensor, ac: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v."""
    s = snr(t, ac)
    clipped = torch.clamp(s, max=gamma)
    return (clipped / (s + 1) if prediction_type == "v_prediction" else clipped / s).float()


def sdxl_time_ids(original_hw: tuple[int, int], crop_top_left: tuple[int, int],
                  target_hw: tuple[int, int]) -> list[int]:
    return [*original_hw, *crop_top_left, *target_hw]


def caption_keep(n: int, p: float, rng: np.random.Generator) -> np.ndarray:
    """Which of ``n`` captions survive a dropout of probability ``p``."""
    return rng.random(n) >= p


def drop_captions(captions: list[str], p: float, rng: np.random.Generator) -> list[str]:
    """Replace each caption by "" with probability ``p`` (the unconditional branch of CFG)."""
    return [c if k else "" for c, k in zip(captions, caption_keep(len(captions), p, rng))]


__all__ = ["add_noise", "alphas_cumprod", "caption_keep", "drop_captions", "min_snr_weights", "offset_noise", "sdxl_time_ids",
           "snr", "target", "velocity"]
