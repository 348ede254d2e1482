"""Evaluating models: FID and CLIP score.

* FID (Heusel et al., 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local
  Nash Equilibrium"): the Frechet distance between Gaussians fitted to Inception-v3 pool features
  of two image sets, ``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))``. Sums are kept in float64
  as features arrive, so a set of any size costs one 2048 x 2048 matrix; the trace of the square
  root comes from symmetric eigenvalues (``frechet_distance``), which stay right when a set has
  fewer images than features.
* CLIP score (Hessel et al., 2021, "CLIPScore"): ``100 * max(cos(image, text), 0)``, averaged.

The models (Inception-v3's pool features, CLIP) come from ``pipeline/models``.
"""
from __future__ import annotations

import numpy as np


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
    """CLIP score and frame consistency with ``pipeline.models.clip.ClipModel`` (local files only;
    the default is the tiny random CLIP, whose numbers mean nothing beyond comparing runs scored
    with it)."""

    def __init__(self, model: str | None = None, pretrained: str | None = None, seed: int = 0):
        from pipeline.models.clip import TINY_CLIP, ClipModel, is_random

        self.name = model or TINY_CLIP
        self.random = is_random(pretrained)
        self.model = ClipModel(self.name, pretrained, seed)

    @property
    def label(self) -> str:
        return self.name + (" (random weights)" if self.random else "")

    def images(self, images: list) -> np.ndarray:
        """L2-normalised embeddings of PIL images."""
        out = [self.model.embed_images([self.model.prepare(im) for im in images[i:i + 32]])
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

# ---- frame interpolation: PSNR and SSIM of predicted frames against the true ones ----

def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images (dB, peak 255); inf where they are equal."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0 ** 2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size) - (size - 1) / 2
    g = np.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity (Wang et al., 2004) of two uint8 images (H, W) or (H, W, 3): an 11-tap
    Gaussian window of sd 1.5, K1 0.01, K2 0.03, L 255, averaged over the positions the window
    fits in whole and over channels."""
    from scipy.ndimage import correlate1d

    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if x.ndim == 2:
        x, y = x[..., None], y[..., None]
    w = _gaussian_window()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    half = len(w) // 2

    def blur(v):
        out = correlate1d(correlate1d(v, w, axis=0, mode="constant"), w, axis=1, mode="constant")
        return out[half:v.shape[0] - half, half:v.shape[1] - half]

    if min(x.shape[:2]) < len(w):
        raise ValueError(f"SSIM needs images of at least {len(w)} px a side, got {x.shape[:2]}")
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    ssim_map = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
    return float(ssim_map.mean())


def linear_blend(first: np.ndarray, last: np.ndarray, t: float) -> np.ndarray:
    """The baseline every interpolator must beat: ``(1 - t) first + t last``, rounded to uint8."""
    out = (1 - t) * np.asarray(first, np.float64) + t * np.asarray(last, np.float64)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


# LPIPS v0.1, AlexNet trunk (Zhang et al., 2018): the input scaling of the released model, and where
# torchvision's alexnet().features ends each of the five slices whose outputs are compared (after
# relu1 .. relu5)
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
LPIPS_TAPS = (2, 5, 8, 10, 12)


class Lpips:
    """The LPIPS distance (Zhang et al., 2018, v0.1 with AlexNet) of two uint8 RGB images: AlexNet
    features after each of its five ReLU blocks, each unit-normalised over channels, their squared
    difference weighted per channel by the learned linear layer, averaged over positions, summed
    over blocks. ``alexnet``: torchvision's ImageNet AlexNet weights (``alexnet-owt-*.pth``, its
    ``features.*`` tensors are used); ``linear``: the five layers of the released LPIPS model
    (``alex.pth`` of the ``lpips`` package, ``lin{k}.model.1.weight``). Both are read with
    ``torch.load(weights_only=True)``."""

    def __init__(self, alexnet: str, linear: str):
        import torch
        import torchvision

        from pipeline.contract.config import ConfigError

        def load(path, key):
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
                raise ConfigError(f"{key}: {path!r} is not a readable weights file ({e})") from None

        self.torch = torch
        self.features = torchvision.models.alexnet().features.eval()
        state = load(alexnet, "--lpips-alexnet")
        state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")} or state
        try:
            self.features.load_state_dict(state)
        except (RuntimeError, KeyError) as e:
            raise ConfigError(f"--lpips-alexnet: {alexnet!r} is not torchvision's AlexNet ({str(e)[:200]})") from None
        lin = load(linear, "--lpips-linear")
        try:
            self.weights = [lin[f"lin{k}.model.1.weight"].float() for k in range(len(LPIPS_TAPS))]
        except (KeyError, TypeError):
            raise ConfigError(f"--lpips-linear: {linear!r} is not LPIPS's AlexNet linear layers (lin0..lin4; the "
                              f"lpips package's weights/v0.1/alex.pth)") from None
        self.shift = torch.tensor(LPIPS_SHIFT).reshape(1, 3, 1, 1)
        self.scale = torch.tensor(LPIPS_SCALE).reshape(1, 3, 1, 1)

    def __call__(self, a: np.ndarray, b: np.ndarray) -> float:
        torch = self.torch
        x = torch.from_numpy(np.stack([a, b]).astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
        x = (x - self.shift) / self.scale
        total, start = 0.0, 0
        with torch.no_grad():
            for tap, w in zip(LPIPS_TAPS, self.weights, strict=True):
                x = self.features[start:tap](x)
                start = tap
                f = x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
                total += float(((f[0] - f[1]) ** 2 * w[0]).sum(dim=0).mean())
        return total

