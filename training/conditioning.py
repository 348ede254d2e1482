"""SVD's image-to-video conditioning, in diffusers' ``StableVideoDiffusionPipeline`` conventions
(Blattmann et al., 2023), so that a model trained here samples correctly with that pipeline:

* the clean conditioning frame's CLIP image embedding is the one cross-attention token;
* the conditioning frame is noised in pixel space, ``frame + s_aug * eps`` with
  ``ln s_aug ~ N(-3, 0.5^2)`` per sample (the pipeline's ``noise_aug_strength`` is that ``s_aug``),
  VAE-encoded (the posterior's mode, unscaled) and concatenated on channels to every frame;
* ``added_time_ids = [fps - 1, motion_bucket_id, noise_aug_strength]`` per sample (the pipeline
  subtracts the 1 from the fps it is given);
* classifier-free guidance drops the image embedding and the concatenated latent, each with its
  own probability.

``motion_bucket_id`` comes from curation's ``motion_score`` through ``MotionBucketMap``.
"""
from __future__ import annotations

import numpy as np
import torch

MOTION_BUCKETS = 256            # motion_bucket_id runs 0..255 (the released models' range; 127 is the default)


def sample_noise_aug(
    n: int, mean: float = -3.0, std: float = 0.5, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per-sample conditioning-noise strengths ``s_aug``, ``ln s_aug ~ N(mean, std^2)``."""
    return (mean + std * torch.randn(n, generator=generator, dtype=torch.float64)).exp().float()


def augment_frame(frame: torch.Tensor, strength: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The conditioning frame (B, 3, H, W in [-1, 1]) noised in pixel space, one strength per sample."""
    return frame + strength.to(frame.dtype).reshape(-1, 1, 1, 1) * noise


def concat_condition(latents: torch.Tensor, cond_latent: torch.Tensor) -> torch.Tensor:
    """(B, F, C, h, w) video latents and a (B, C, h, w) frame latent -> (B, F, 2C, h, w): the frame
    latent repeated on every frame and concatenated on channels (UNet in_channels 8 for C = 4)."""
    return torch.cat([latents, cond_latent.unsqueeze(1).expand(-1, latents.shape[1], -1, -1, -1)], dim=2)


def svd_time_ids(fps: torch.Tensor, motion_bucket_id: torch.Tensor, noise_aug: torch.Tensor) -> torch.Tensor:
    """(B, 3): ``[fps - 1, motion_bucket_id, noise_aug_strength]`` per sample, where ``fps`` is the
    frame rate of the sampled frames (``sampled_fps``)."""
    return torch.stack([fps.float() - 1, motion_bucket_id.float(), noise_aug.float()], dim=1)


def sampled_fps(clip_fps: float, stride: int) -> float:
    """The frame rate of every ``stride``-th frame of a clip shot at ``clip_fps``."""
    return float(clip_fps) / int(stride)


class MotionBucketMap:
    """``motion_score`` -> ``motion_bucket_id`` in 0..255: the empirical CDF of the training clips'
    scores, scaled to 255 and rounded.

    Why a rank and not a linear rescale: motion scores are heavy-tailed (a few whip pans dwarf
    everything), so a linear map would crowd most clips into a handful of buckets. The rank spreads
    them evenly, it is monotone by construction, and the pipeline's default ``motion_bucket_id``
    of 127 then means what it means to users: the median motion of the training data. Tied scores
    share their mid-rank. The map is stored (``to_dict``) in the run and the exported pipeline so
    inference conditions exactly as training did; scores outside the fitted range clamp to 0 / 255.
    """

    def __init__(self, knots: list[float], ranks: list[float]):
        self.knots = np.asarray(knots, dtype=np.float64)
        self.ranks = np.asarray(ranks, dtype=np.float64)

    @classmethod
    def fit(cls, scores, max_knots: int = 257) -> MotionBucketMap:
        v = np.asarray([s for s in scores if s is not None], dtype=np.float64)
        v = np.sort(v[np.isfinite(v)])
        if v.size == 0:
            raise ValueError("no finite motion_score to fit the motion-bucket map on; curate with the motion stage")
        if v.size == 1:
            return cls([float(v[0])], [0.5])
        cdf = np.arange(v.size) / (v.size - 1)                       # rank / (n - 1): min -> 0, max -> 1
        knots, inverse = np.unique(v, return_inverse=True)
        ranks = np.bincount(inverse, weights=cdf) / np.bincount(inverse)   # ties: their mean rank
        if knots.size > max_knots:                                   # keep the map small: even quantiles
            idx = np.unique(np.round(np.linspace(0, knots.size - 1, max_knots)).astype(int))
            knots, ranks = knots[idx], ranks[idx]
        return cls(knots.tolist(), ranks.tolist())

    def __call__(self, scores) -> np.ndarray:
        s = np.asarray(scores, dtype=np.float64)
        r = np.interp(s, self.knots, self.ranks) if self.knots.size > 1 else np.full(s.shape, self.ranks[0])
        r = np.where(np.isfinite(s), r, 0.5)                        # no score: the middle bucket
        return np.clip(np.round(r * (MOTION_BUCKETS - 1)), 0, MOTION_BUCKETS - 1).astype(np.int64)

    def to_dict(self) -> dict:
        return {"kind": "empirical_cdf", "buckets": MOTION_BUCKETS, "knots": self.knots.tolist(),
                "ranks": self.ranks.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> MotionBucketMap:
        if d.get("kind") != "empirical_cdf" or len(d["knots"]) != len(d["ranks"]) or not d["knots"]:
            raise ValueError("not a motion-bucket map winnow wrote")
        return cls(d["knots"], d["ranks"])



__all__ = ["MOTION_BUCKETS", "MotionBucketMap", "augment_frame", "concat_condition", "sample_noise_aug",
           "sampled_fps", "svd_time_ids"]
