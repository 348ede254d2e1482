"""LAION aesthetic score from the CLIP image embedding the ``clip`` stage already computed.

The head follows the architecture of LAION's improved aesthetic predictor (Schuhmann,
"improved-aesthetic-predictor", 2022): an MLP (in -> 1024 -> 128 -> 64 -> 16 -> 1, dropout
between the first layers) on the L2-normalised CLIP ViT-L/14 image embedding, trained to
predict AVA/SAC ratings, so scores stay on LAION's 1-10 scale (SD 1.x kept >= 5, SD 2 >= 4.5).
The first LAION predictor (a single linear layer) loads too. Layer sizes are read from the
state dict, so a head saved by that project (``sac+logos+ava1-l14-linearMSE.pth``) loads as is.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.contract.config import ConfigError, option
from pipeline.contract.schema import AESTHETIC_SCORE, CLIP_FRAMES, FRAME_EMBEDDINGS, IMAGE_EMBEDDING
from pipeline.contract.stage import Stage, active, column, reject

LAION_HIDDEN = (1024, 128, 64, 16)
TINY_HIDDEN = (32, 16, 8, 4)
_DROPOUT = {1: 0.2, 3: 0.2, 5: 0.1}   # Sequential index -> dropout, as in LAION's head


@dataclass
class AestheticConfig:
    weights: str = option("random", "path to the predictor's state dict (.pth/.pt/.safetensors), or 'random' "
                          "for a seeded random head (tests and the demo: its scores mean nothing)")
    seed: int = option(0, "seed of the random head")
    min_score: float | None = option(None, "reject samples scoring below this (SD 1.x: 5.0, SD 2: 4.5)", min=0, max=10)


class AestheticMLP(nn.Module):
    """LAION's layout: Linear/Dropout pairs, then the last two Linear layers back to back, so a
    state dict saved by LAION's project has the same keys (layers.0 ... layers.7)."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...] = LAION_HIDDEN):
        super().__init__()
        layers: list[nn.Module] = []
        dims = (in_dim, *hidden)
        for i in range(len(hidden)):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(hidden) - 1:
                layers.append(nn.Dropout(_DROPOUT.get(len(layers), 0.1)))
        layers.append(nn.Linear(dims[-1], 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


def read_state_dict(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return state


def head_from_state(state: dict):
    """Build the module a state dict describes (LAION MLP or single linear layer) and load it."""
    if set(state) == {"weight", "bias"}:
        head = nn.Linear(state["weight"].shape[1], 1)
        head.load_state_dict(state)
        return head, int(state["weight"].shape[1])
    linear = sorted(int(m.group(1)) for k in state if (m := re.fullmatch(r"layers\.(\d+)\.weight", k)))
    if not linear:
        raise ValueError(
            f"not an aesthetic head: expected keys layers.N.weight or weight/bias, got {sorted(state)[:6]}"
        )
    in_dim = int(state[f"layers.{linear[0]}.weight"].shape[1])
    hidden = tuple(int(state[f"layers.{i}.weight"].shape[0]) for i in linear[:-1])
    head = AestheticMLP(in_dim, hidden)
    head.load_state_dict(state)
    return head, in_dim


def load_head(config: AestheticConfig, in_dim: int | None):
    if config.weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            head = AestheticMLP(in_dim or 768, TINY_HIDDEN if (in_dim or 768) < 768 else LAION_HIDDEN)
        return head.eval(), in_dim or 768
    head, dim = head_from_state(read_state_dict(config.weights))
    return head.eval(), dim


class AestheticScore(Stage):
    """Adds ``aesthetic_score`` (LAION's 1-10 scale) from ``clip_image_embedding``."""

    name = "aesthetic"
    Config = AestheticConfig
    num_cpus = 1.0     # a few matrix products per batch: a task, fused with its neighbours
    batch_size = 64
    after = ("clip",)

    @classmethod
    def notices(cls, config: AestheticConfig, earlier: list[tuple[str, Any]]) -> list[str]:
        from curation.clip import ClipConfig, is_random

        clips = [c for n, c in earlier if n == "clip" and isinstance(c, ClipConfig)]
        filt = f"; min_score {config.min_score:g} rejects at random" if config.min_score is not None else ""
        if config.weights == "random":
            return [f"aesthetic: the head has random weights (weights: random), so aesthetic_score means nothing"
                    f"{filt}; give LAION's head in aesthetic.weights"]
        if clips and is_random(clips[-1]):
            return [f"aesthetic: its CLIP embeddings come from a random CLIP, so aesthetic_score means nothing{filt}"]
        return []

    @classmethod
    def validate(cls, config: AestheticConfig, key: str, earlier: list[tuple[str, Any]]) -> None:
        super().validate(config, key, earlier)
        from curation.clip import embedding_dim

        clip_dim = embedding_dim(earlier)
        if config.weights == "random":
            return
        if not os.path.isfile(config.weights):
            raise ConfigError(f"{key}.weights: file {config.weights!r} does not exist; download LAION's "
                              f"sac+logos+ava1-l14-linearMSE.pth on a machine with network and give its path here")
        try:
            _, dim = head_from_state(read_state_dict(config.weights))
        except Exception as exc:  # noqa: BLE001 - any load failure is a config problem
            raise ConfigError(f"{key}.weights: cannot load {config.weights!r}: {exc}") from None
        if clip_dim is not None and dim != clip_dim:
            raise ConfigError(f"{key}.weights: the head expects {dim}-d CLIP embeddings but the clip stage gives "
                              f"{clip_dim}-d; LAION's head needs clip model ViT-L-14")

    def __init__(self, config: AestheticConfig | None = None):
        super().__init__(config or AestheticConfig())
        self.head = None

    def __call__(self, batch):
        keep = active(batch)
        scores = column(batch, AESTHETIC_SCORE)
        frames = batch.get(FRAME_EMBEDDINGS)
        emb = batch.get(IMAGE_EMBEDDING) if frames is None else frames
        if emb is None:
            return batch
        emb = np.asarray(emb, dtype=np.float32)
        if frames is not None:     # a clip: score each frame, keep the mean (SVD's LVD)
            emb = emb.reshape(len(emb), CLIP_FRAMES, -1)
        if self.head is None:
            self.head, _ = load_head(self.config, emb.shape[-1])
        rows = [i for i in np.flatnonzero(keep) if not np.isnan(emb[i]).any()]
        if not rows:
            return batch
        with torch.inference_mode():
            out = self.head(torch.from_numpy(emb[rows])).squeeze(-1)
            out = (out.mean(dim=-1) if frames is not None else out).numpy()
        floor = self.config.min_score
        for i, s in zip(rows, out.tolist(), strict=True):
            scores[i] = float(s)
            if floor is not None and s < floor:
                reject(batch, int(i), f"aesthetic_score: {s:.2f} < {floor}")
        return batch


__all__ = ["AestheticConfig", "AestheticMLP", "AestheticScore", "head_from_state", "load_head"]
