"""Where a model runs."""
from __future__ import annotations


def pick_device(device: str, threads: int = 1) -> str:
    """``cuda`` when asked for (or ``auto``) and there is one (Ray sets CUDA_VISIBLE_DEVICES for an
    actor given a GPU), else ``cpu`` with torch limited to ``threads`` threads: one actor per CPU
    share, and more threads than that only fight the other actors."""
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return "cuda"
    torch.set_num_threads(max(1, int(threads)))
    return "cpu"
