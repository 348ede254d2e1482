"""Frame interpolation on SVD's UNet (Blattmann et al., 2023, sec. 4.4, following the masked
frame conditioning of Blattmann et al., 2023, "Align your Latents"): a clip of F frames sampled
at the target rate (``video.fps``, e.g. 4x the rate of the video to fill), its first and last
frames given, the F - 2 between them predicted.

The UNet's input is ``[noisy latents (C), the given frames' latents at their positions, zero
elsewhere (C), a mask that is 1 on given frames (1)]`` on channels: ``in_channels`` 2C + 1 = 9.
An ``svd`` (8 channels) or ``svd_t2v`` (4) stage widens into it with zero new ``conv_in``
channels, so at the start it computes what its parent did. The rest is SVD's: the first frame's
CLIP image embedding as the cross-attention token, ``[fps - 1, motion_bucket_id, noise_aug]``
time ids, EDM in v-parameterisation. The loss counts the frames between only (the given ones are
in the input). ``video.concat_dropout`` drops the given frames (and ``image_dropout`` the
embedding) for classifier-free guidance, which ``interpolate(..., guidance > 1)`` uses.

The export is the UNet in diffusers' format inside an SVD-layout folder (``unet/`` with 9 input
channels, ``vae/``, ``image_encoder/``, ``feature_extractor/``, ``scheduler/``) plus
``interpolation.json``; diffusers has no interpolation pipeline, so ``interpolate`` below (and
``training.generate.interpolate_video``) samples it.
"""
from __future__ import annotations

import json
import os
from typing import ClassVar

import numpy as np
import torch

from pipeline.contract.config import ConfigError
from training.families.base import Components
from training.families.svd import SVD

INFO = "interpolation.json"
SAMPLE_NOISE_AUG = 0.02          # the given frames' noise at sampling (the SVD pipeline's default strength)


def given_mask(frames: int) -> torch.Tensor:
    """(F,) bool: the first and the last frame are given."""
    m = torch.zeros(frames, dtype=torch.bool)
    m[0] = m[-1] = True
    return m


def interp_condition(given_latents: torch.Tensor, mask: torch.Tensor, frames: int) -> torch.Tensor:
    """(B, F, C + 1, h, w): the given frames' latents (B, G, C, h, w) at the ``mask`` positions,
    zero elsewhere, and the mask as one more channel."""
    b, _, c, h, w = given_latents.shape
    cond = given_latents.new_zeros(b, frames, c, h, w)
    cond[:, mask] = given_latents
    flag = mask.to(given_latents.dtype).reshape(1, frames, 1, 1, 1).expand(b, frames, 1, h, w)
    return torch.cat([cond, flag], dim=2)


def karras_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 700.0, rho: float = 7.0) -> torch.Tensor:
    """EDM's sampling noise levels (Karras et al., 2022, eq. 5), then 0."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    s = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)]).float()


class SVDInterp(SVD):
    name = "svd_interp"
    follows = ("svd", "svd_t2v")     # either widens into this UNet (conv_in 8 or 4 -> 9, new channels zero)
    in_channels: ClassVar[int] = 9   # noisy latents + given frames' latents + the given-frame mask

    def check_spec(self, spec) -> None:
        super().check_spec(spec)
        from training.buckets import video_bucket_table

        for b in video_bucket_table(spec.video.buckets):
            if b.frames < 3:
                raise ConfigError(f"video.buckets: {b.frames} frames leave none between the first and the last; "
                                  f"svd_interp needs at least 3 (5: three between, SVD's 4x interpolation)")

    def export(self, c: Components, unet, folder: str) -> str:
        super().export(c, unet, folder)
        with open(os.path.join(folder, INFO), "w", encoding="utf-8") as fh:
            json.dump({"kind": self.name, "given": "first and last", "in_channels": self.in_channels}, fh, indent=1)
        return folder

    # ---- training ----
    def loss(self, c: Components, frames: torch.Tensor, fps: torch.Tensor, motion_bucket_id: torch.Tensor, edm,
             p_mean: float, p_std: float, g: torch.Generator, keep_image: torch.Tensor, keep_concat: torch.Tensor,
             unet=None, aug_mean: float = -3.0, aug_std: float = 0.5) -> torch.Tensor:
        """Per-clip EDM loss over the frames between the given ones. ``frames`` (B, F, 3, H, W) in
        [-1, 1]; ``keep_concat`` (B,) False drops the given frames (and the mask) for CFG."""
        from training.conditioning import sample_noise_aug, svd_time_ids
        from training.objectives import sample_sigmas

        unet = c.unet if unet is None else unet
        b, f = frames.shape[:2]
        device = frames.device
        mask = given_mask(f).to(device)
        latents = self.frame_latents(c, frames, g)
        with torch.no_grad():
            embeds = self.encode_image(c, frames[:, 0]) * keep_image.to(device, torch.float32).reshape(-1, 1, 1)
            aug = sample_noise_aug(b, aug_mean, aug_std, generator=g).to(device)
            cond = self.given_latents(c, frames[:, mask], aug, g)
            cond = cond * keep_concat.to(device, torch.float32).reshape(-1, 1, 1, 1, 1)
        sigma = sample_sigmas(b, p_mean, p_std, g).to(device)
        noisy = edm.noisy(latents, torch.randn(latents.shape, generator=g).to(device), sigma)
        model_in = torch.cat([edm.model_input(noisy, sigma), interp_condition(cond, mask, f)], dim=2)
        out = unet(model_in, edm.c_noise(sigma), embeds,
                   added_time_ids=svd_time_ids(fps, motion_bucket_id, aug).to(device)).sample
        between = ~mask
        return edm.loss(noisy[:, between], out[:, between], latents[:, between], sigma)

    @torch.no_grad()
    def given_latents(self, c: Components, given: torch.Tensor, aug: torch.Tensor, g: torch.Generator | None):
        """(B, G, C, h, w) latents (the posterior's mode, unscaled as SVD's concatenated frame) of the
        given frames (B, G, 3, H, W), each noised with its clip's ``aug`` strength first."""
        b, n = given.shape[:2]
        noise = torch.randn(given.shape, generator=g) if g is not None else torch.randn(given.shape)
        x = given + aug.to(given.dtype).reshape(-1, 1, 1, 1, 1) * noise.to(given.device, given.dtype)
        vae = c.vae
        z = vae.encode(x.flatten(0, 1).to(next(vae.parameters()).dtype)).latent_dist.mode().float()
        return z.unflatten(0, (b, n))

    # ---- sampling ----
    @torch.no_grad()
    def interpolate(self, c: Components, unet, first, last, frames: int, steps: int, fps: float, seed: int,
                    device="cpu", motion_bucket_id: int = 127, guidance: float = 1.0) -> list:
        """The ``frames`` - 2 frames between two PIL images (the same size, sides multiples of 8), as
        PIL images: Euler steps of the EDM ODE over Karras noise levels, from noise seeded ``seed``.
        ``guidance`` > 1: classifier-free guidance against the model without its given frames."""
        from PIL import Image

        from training.conditioning import svd_time_ids
        from training.objectives import EDM

        unet = c.unet if unet is None else unet
        to = lambda im: torch.from_numpy(np.asarray(im.convert("RGB"), np.float32) / 127.5 - 1).permute(2, 0, 1)  # noqa: E731
        given = torch.stack([to(first), to(last)]).unsqueeze(0).to(device)            # (1, 2, 3, H, W)
        mask = given_mask(frames).to(device)
        aug = torch.tensor([SAMPLE_NOISE_AUG], device=device)
        g = torch.Generator("cpu").manual_seed(seed)
        cond = interp_condition(self.given_latents(c, given, aug, g), mask, frames)
        embeds = self.encode_image(c, given[:, 0])
        ids = svd_time_ids(torch.tensor([fps]), torch.tensor([motion_bucket_id]), aug.cpu()).to(device)
        if guidance > 1:
            cond = torch.cat([torch.zeros_like(cond), cond])
            embeds = torch.cat([torch.zeros_like(embeds), embeds])
            ids = ids.repeat(2, 1)
        edm = EDM(1.0)
        h, w = given.shape[-2] // 8, given.shape[-1] // 8
        ch = c.vae.config.latent_channels
        sigmas = karras_sigmas(steps).to(device)
        x = torch.randn((1, frames, ch, h, w), generator=g).to(device) * sigmas[0]
        dtype = next(unet.parameters()).dtype
        for i in range(steps):
            s = sigmas[i:i + 1]
            xin = torch.cat([x] * (2 if guidance > 1 else 1))
            model_in = torch.cat([edm.model_input(xin, s.expand(len(xin))), cond], dim=2)
            out = unet(model_in.to(dtype), edm.c_noise(s).expand(len(xin)).to(dtype), embeds.to(dtype),
                       added_time_ids=ids.to(dtype)).sample.float()
            den = edm.denoise(xin, out, s.expand(len(xin)))
            if guidance > 1:
                uncond, cnd = den.chunk(2)
                den = uncond + guidance * (cnd - uncond)
            x = x + (x - den) / s * (sigmas[i + 1] - s)
        video = c.vae.decode(x.flatten(0, 1) / c.vae.config.scaling_factor, num_frames=frames).sample
        video = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(v) for v in video[1:-1]]

    def sample_videos(self, c: Components, unet, bucket, steps: int, fps: float, seed: int, device, prompts: list[str],
                      first_frame) -> list[list]:
        """For the run's samples/: the frames between ``first_frame()`` and the same frame shifted
        (the training clip's own last frame is in ``training_samples``)."""
        first, last = first_frame()
        between = self.interpolate(c, unet, first, last, bucket.frames, steps, fps, seed, device)
        return [[first, *between, last]]

    def training_samples(self, ctx, unet, loader, buckets) -> list[list]:
        """Rank 0: the first training clip's first and last frames at the run's rate, filled in."""
        from PIL import Image

        from training.video_frames import decode_frames

        spec = ctx.spec
        first = int(np.flatnonzero(loader.bucket_of >= 0)[0])
        bucket = buckets[int(loader.bucket_of[first])]

        def ends():
            span = (bucket.frames - 1) / spec.video.fps
            frames = decode_frames(loader.reader.read(first), [0.0, span])[0]
            return [Image.fromarray(f).resize((bucket.width, bucket.height)) for f in (frames[0], frames[-1])]

        with ctx.autocast():
            return self.sample_videos(ctx.comps, unet, bucket, spec.train.sample_steps, spec.video.fps,
                                      spec.train.seed, ctx.device, [], ends)

    def interpolates(self) -> bool:
        return True

    def check_generate(self, frames: bool) -> None:
        raise ConfigError("--run: an svd_interp run fills in frames between given ones; score it with `winnow eval "
                          "--run RUN --clips FOLDER` (PSNR and SSIM against the true frames and the linear blend)")


__all__ = ["INFO", "SVDInterp", "given_mask", "interp_condition", "karras_sigmas"]
