"""Evaluating models: FID and CLIP score.

* FID (Heusel et al., 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local
  Nash Equilibrium"): the Frechet distance between Gaussians fitted to Inception-v3 pool features
  of two image sets, ``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))``. Sums are kept in float64
  as features arrive, so a set of any size costs one 2048 x 2048 matrix; the trace of the square
  root comes from symmetric eigenvalues (``frechet_distance``), which stay right when a set has
  fewer images than features.
* CLIP score (Hessel et al., 2021, "CLIPScore"): ``100 * max(cos(image, text), 0)``, averaged.

Inception weights come from a file (torchvision's ``inception_v3_google`` state dict, or
pytorch-fid's ``pt_inception-2015-12-05``) or are a seeded random network: for tests and the demo
only, whose numbers mean nothing.
"""
from __future__ import annotations

import warnings

import numpy as np

POOL_DIM = 2048
INCEPTION_SIZE = 299


class FeatureStats:
    """Running mean and covariance of feature vectors, in float64. Up to ``keep`` feature rows are
    also kept: two sets that small are compared exactly in data space (``fid_of``)."""

    def __init__(self, dim: int, keep: int = 4096):
        self.n = 0
        self.total = np.zeros(dim, np.float64)
        self.outer = np.zeros((dim, dim), np.float64)
        self.keep = keep
        self.rows: list[np.ndarray] | None = []

    def add(self, features) -> None:
        f = np.asarray(features, np.float64).reshape(len(features), -1)
        self.n += len(f)
        self.total += f.sum(axis=0)
        self.outer += f.T @ f
        if self.rows is not None:
            self.rows.append(f)
            if self.n > self.keep:
                self.rows = None

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased covariance (n - 1), as pytorch-fid's ``np.cov`` and torchmetrics use."""
        if self.n < 2:
            raise ValueError(f"FID needs at least 2 images per set; got {self.n}")
        mu = self.total / self.n
        cov = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, cov

    def centered(self) -> np.ndarray | None:
        """The kept rows minus their mean, scaled by 1 / sqrt(n - 1) (so X^T X is the covariance)."""
        if self.rows is None or self.n < 2:
            return None
        x = np.concatenate(self.rows)
        return (x - x.mean(axis=0)) / np.sqrt(self.n - 1)


def fid_of(a: FeatureStats, b: FeatureStats) -> float:
    """FID of two accumulated sets. When both were small enough to keep, the trace of the square
    root is the nuclear norm of the cross product of the centred feature rows: the nonzero
    eigenvalues of ``S1 S2 = X1'X1 X2'X2`` are the squared singular values of ``X1 X2'``. That is
    exact where covariances of fewer images than features are singular."""
    xa, xb = a.centered(), b.centered()
    if xa is None or xb is None:
        return frechet_distance(*a.mean_cov(), *b.mean_cov())
    diff = a.total / a.n - b.total / b.n
    tr_root = float(np.linalg.svd(xa @ xb.T, compute_uv=False).sum())
    return float(diff @ diff + (xa * xa).sum() + (xb * xb).sum() - 2 * tr_root)


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((m + m.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """The Frechet distance between N(mu1, cov1) and N(mu2, cov2), in float64.

    ``Tr((S1 S2)^(1/2))`` is taken as the sum of the square roots of the eigenvalues of the symmetric
    ``S1^(1/2) S2 S1^(1/2)`` (the same spectrum as ``S1 S2``; Mathiasen & Hvilshoj, 2020, compute FID
    this way): it holds for the singular covariances of a set smaller than the feature size, where
    ``sqrtm(S1 S2)`` returns nonsense."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    diff = mu1 - mu2
    root1 = _psd_sqrt(cov1)
    middle = root1 @ cov2 @ root1
    tr_root = float(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum())
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * tr_root)


def cosines(a, b) -> np.ndarray:
    """Row-wise cosine similarity of two equally shaped embedding arrays."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"image and text embeddings differ in shape: {a.shape} vs {b.shape}")
    return (a * b).sum(axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def scores_of(cos) -> np.ndarray:
    """CLIP score (Hessel et al., 2021) of cosines: ``100 * max(cos, 0)``."""
    return 100.0 * np.maximum(cos, 0.0)


def clip_score(image_embeddings, text_embeddings) -> tuple[float, np.ndarray]:
    """(mean, per pair) of ``100 * max(cos, 0)`` over matching rows of the two embedding arrays."""
    per = scores_of(cosines(image_embeddings, text_embeddings))
    return float(per.mean()) if len(per) else float("nan"), per


class ClipScorer:
    """CLIP score and frame consistency with an open_clip model resolved as curation resolves it
    (``curation.clip``: local files only; the default is the tiny random CLIP, whose numbers mean
    nothing beyond comparing runs scored with it)."""

    def __init__(self, model: str | None = None, pretrained: str | None = None, seed: int = 0):
        from curation.clip import TINY_CLIP, ClipConfig, ClipEmbed

        self.name = model or TINY_CLIP
        self.random = pretrained in (None, "random")
        self.model = ClipEmbed(ClipConfig(model=self.name, pretrained=pretrained, seed=seed, text=True))

    @property
    def label(self) -> str:
        return self.name + (" (random weights)" if self.random else "")

    def images(self, images: list) -> np.ndarray:
        """L2-normalised embeddings of PIL images."""
        out = [self.model.embed_images([self.model.preprocess(im) for im in images[i:i + 32]])
               for i in range(0, len(images), 32)]
        return np.concatenate(out) if out else np.zeros((0, self.model.dim), np.float32)

    def texts(self, texts: list[str]) -> np.ndarray:
        out = [self.model.embed_texts(texts[i:i + 64]) for i in range(0, len(texts), 64)]
        return np.concatenate(out) if out else np.zeros((0, self.model.dim), np.float32)

    def pairs(self, images: list, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(CLIP score, raw cosine) per image against its prompt. The score clips negative cosines
        to 0, so a random model can score 0 everywhere while its cosines still differ."""
        cos = cosines(self.images(images), self.texts(prompts))
        return scores_of(cos), cos

    def score(self, images: list, prompts: list[str]) -> tuple[float, float]:
        """(mean CLIP score, mean cosine) of images against their prompts."""
        scores, cos = self.pairs(images, prompts)
        return float(scores.mean()), float(cos.mean())

    def video(self, frames: list, prompt: str) -> tuple[float, float, float]:
        """(per-frame CLIP score against the prompt, frame consistency, mean cosine) of one video."""
        e = self.images(frames)
        cos = cosines(e, np.repeat(self.texts([prompt]), len(e), axis=0))
        return float(scores_of(cos).mean()), frame_consistency(e), float(cos.mean())


def frame_consistency(frame_embeddings) -> float:
    """Mean cosine of consecutive frames' CLIP image embeddings."""
    e = np.asarray(frame_embeddings, np.float64)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    return float((e[1:] * e[:-1]).sum(axis=1).mean()) if len(e) > 1 else float("nan")


def inception(weights: str, seed: int = 0):
    """Inception-v3 up to its 2048-d pool, as a module taking uint8 images (N, 3, H, W).

    ``weights``: a path to torchvision's ``inception_v3_google`` state dict or pytorch-fid's
    ``pt_inception-2015-12-05`` (told apart by its 1008-class head; ``fid_blocks``), loaded with
    ``weights_only=True``; or ``"random"``: seeded random weights, with a warning that its FID
    means nothing beyond comparing runs scored by the same random network."""
    import torch
    from torchvision.models import inception_v3

    class InceptionPool(torch.nn.Module):
        num_features = POOL_DIM

        def __init__(self, net):
            super().__init__()
            self.net = net

        @torch.no_grad()
        def forward(self, images):
            x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
            x = torch.nn.functional.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear",
                                                align_corners=False)
            return self.net(2.0 * x - 1.0)        # the [-1, 1] input Inception was trained on

    if weights == "random":
        warnings.warn("FID with a random Inception (--fid-weights random): the numbers compare runs scored "
                      "by this same network and mean nothing else", stacklevel=2)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            net = inception_v3(weights=None, aux_logits=False, init_weights=False, transform_input=False)
            for m in net.modules():      # He init: activations stay O(1) through the untrained BatchNorms
                if isinstance(m, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    else:
        net = inception_v3(weights=None, aux_logits=False, init_weights=False, transform_input=False)
        state = torch.load(weights, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"{weights}: not torchvision's Inception-v3 weights (not a state dict)")
        fc = state.get("fc.weight")
        if fc is not None and tuple(fc.shape) == (1008, POOL_DIM):    # pytorch-fid's file: the TF FID graph
            fid_blocks(net)
        state = {k: v for k, v in state.items() if not k.startswith(("AuxLogits.", "fc."))}
        missing, unexpected = net.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise ValueError(f"{weights}: not torchvision's Inception-v3 weights (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
    net.fc = torch.nn.Identity()
    return InceptionPool(net.eval()).eval()


def fid_blocks(net) -> None:
    """Turn torchvision's Inception-v3 into the network FID's reference weights were made for
    (the TensorFlow graph of Heusel et al., as pytorch-fid ports it, whose file
    ``pt_inception-2015-12-05`` has 1008 classes): its mixed blocks average-pool their pool branch
    without counting the padding, and the last one max-pools it. Only that branch differs, so
    each block keeps its layers and weights and recomputes that one branch."""
    import torch.nn.functional as F
    from torchvision.models.inception import InceptionA, InceptionC, InceptionE

    def block(base, pool):
        class FIDBlock(base):
            def _forward(self, x):
                outs = super()._forward(x)
                outs[-1] = self.branch_pool(pool(x))
                return outs
        FIDBlock.__name__ = f"FID{base.__name__}"
        return FIDBlock

    def avg(x):
        return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)

    def mx(x):
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)

    kinds = {"A": block(InceptionA, avg), "C": block(InceptionC, avg), "E_1": block(InceptionE, avg),
             "E_2": block(InceptionE, mx)}
    for name, kind in (("Mixed_5b", "A"), ("Mixed_5c", "A"), ("Mixed_5d", "A"), ("Mixed_6b", "C"), ("Mixed_6c", "C"),
                       ("Mixed_6d", "C"), ("Mixed_6e", "C"), ("Mixed_7b", "E_1"), ("Mixed_7c", "E_2")):
        getattr(net, name).__class__ = kinds[kind]


def stats_of(model, batches) -> FeatureStats:
    """Pool-feature statistics of uint8 image batches (N, 3, H, W), one batch in memory at a time."""
    import torch

    stats = FeatureStats(model.num_features)
    for chunk in batches:
        stats.add(model(torch.as_tensor(np.asarray(chunk))).double().numpy())
    return stats


def fid(model, images_a, images_b, batch: int = 32) -> float:
    """FID between two sets of uint8 images (N, 3, H, W)."""
    def chunks(images):
        return (images[i:i + batch] for i in range(0, len(images), batch))

    return fid_of(stats_of(model, chunks(images_a)), stats_of(model, chunks(images_b)))
