"""The diffusion training math, one small function per piece, each tested against diffusers.

* forward process ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps`` (Ho et al., 2020) on SD's
  "scaled linear" beta schedule;
* targets: epsilon, or velocity ``v = sqrt(a_t) eps - sqrt(1 - a_t) x_0`` (Salimans & Ho, 2022;
  SD 2's 768 model);
* offset noise (Guttenberg, 2023; SDXL used 0.05): a per-channel constant added to the noise;
* min-SNR-gamma loss weights (Hang et al., 2023);
* SDXL's micro-conditioning ids, in diffusers' order: original size (h, w), crop top-left
  (top, left), target size (h, w) (Podell et al., 2023);
* caption dropout for classifier-free guidance (Ho & Salimans, 2022);
* EDM (Karras et al., 2022) preconditioning and loss weights, in SVD's v-parameterisation with
  sigma_data 1 (Blattmann et al., 2023) or EDM's own with sigma_data 0.5, and its log-normal
  sigma sampling, one sigma per video.
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


def target(
    prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, ac: torch.Tensor
) -> torch.Tensor:
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
    """SDXL's micro-conditioning of one sample (Podell et al., 2023, section 2.2), in the order the
    diffusers pipeline builds it: original (h, w), crop (top, left), target (h, w)."""
    return [*original_hw, *crop_top_left, *target_hw]


def caption_keep(n: int, p: float, rng: np.random.Generator) -> np.ndarray:
    """Which of ``n`` captions survive a dropout of probability ``p``."""
    return rng.random(n) >= p


class EDM:
    """EDM preconditioning: ``D(x; s) = c_skip(s) x + c_out(s) F(c_in(s) x; c_noise(s))``, the noisy
    input ``x = x0 + s eps`` and the loss ``weight(s) ||D(x; s) - x0||^2``.

    ``sigma_data = 1, v_param = True`` is SVD's (``c_out = -s / sqrt(s^2 + 1)``: F predicts
    velocity, as diffusers' ``EulerDiscreteScheduler(prediction_type="v_prediction",
    timestep_type="continuous")`` reads it); ``sigma_data = 0.5, v_param = False`` is EDM's own.
    ``c_noise = ln(s) / 4`` in both."""

    def __init__(self, sigma_data: float = 1.0, v_param: bool = True):
        self.sigma_data, self.v_param = float(sigma_data), bool(v_param)

    def _s(self, sigma: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
        """sigma shaped to broadcast over ``like`` (one sigma per leading index)."""
        return sigma if like is None else sigma.reshape((-1,) + (1,) * (like.ndim - 1)).to(like.dtype)

    def c_skip(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)

    def c_out(self, sigma: torch.Tensor) -> torch.Tensor:
        c = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        return -c if self.v_param else c

    def c_in(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1 / (sigma ** 2 + self.sigma_data ** 2).sqrt()

    @staticmethod
    def c_noise(sigma: torch.Tensor) -> torch.Tensor:
        return 0.25 * sigma.log()

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return x0 + self._s(sigma, x0) * noise

    def model_input(self, noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self._s(self.c_in(sigma), noisy) * noisy

    def denoise(self, noisy: torch.Tensor, model_output: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self._s(self.c_skip(sigma), noisy) * noisy + self._s(self.c_out(sigma), noisy) * model_output

    def loss(
        self, noisy: torch.Tensor, model_output: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor
    ) -> torch.Tensor:
        """Per-sample ``weight(s) * mean((D(x; s) - x0)^2)`` over everything but the first dimension."""
        err = (self.denoise(noisy.float(), model_output.float(), sigma.float()) - x0.float()) ** 2
        return self.weight(sigma.float()) * err.mean(dim=list(range(1, err.ndim)))


def sample_sigmas(n: int, p_mean: float, p_std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``ln s ~ N(p_mean, p_std^2)``, one sigma per sample (a video's frames share it)."""
    return (p_mean + p_std * torch.randn(n, generator=generator, dtype=torch.float64)).exp().float()


__all__ = ["EDM", "add_noise", "alphas_cumprod", "caption_keep", "min_snr_weights", "offset_noise",
           "sample_sigmas", "sdxl_time_ids", "snr", "target", "velocity"]
