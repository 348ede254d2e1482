"""Model families by ``model.kind``: one file each; a new family is a new file and one line here."""
from __future__ import annotations

from pipeline.contract.config import ConfigError
from training.families.base import Family
from training.families.sd import SD
from training.families.sdxl import SDXL
from training.families.svd import SVD, SVDText
from training.families.svd_interp import SVDInterp

FAMILIES: dict[str, Family] = {f.name: f for f in (SD(), SDXL(), SVD(), SVDText(), SVDInterp())}


def get(kind: str) -> Family:
    try:
        return FAMILIES[kind]
    except KeyError:
        raise KeyError(f"unknown model.kind {kind!r}; known: {', '.join(sorted(FAMILIES))}") from None


def transition(before: Family, now: Family, where: str, carry: bool = False) -> str:
    """How a curriculum stage of family ``now`` starts from the stage before's final pipeline:
    ``same`` (the same family: the pipeline as it is), ``inflate`` (an image UNet inflated into a
    video one, ``training/inflate.py``) or ``widen`` (a text-to-video UNet's conv_in widened for the
    concatenated frame). Anything else is a ConfigError naming ``where``; an optimizer is carried
    (``carry``) only within one family."""
    if before.name == now.name:
        return "same"
    if carry:
        raise ConfigError(f"{where}: optimizer: carry needs the same model as the stage before "
                          f"({before.name} -> {now.name} changes its parameters); use reset")
    if before.clips and not now.clips:
        raise ConfigError(f"{where}: init: previous cannot turn a video model back into an image model")
    if not before.clips and now.clips:
        if not before.inflates:
            raise ConfigError(f"{where}: init: previous: only an sd (SD 1.x / 2.x) stage inflates into a video stage; "
                              f"the stage before is {before.name}")
        return "inflate"
    if before.clips and now.clips:
        if before.name not in now.follows:
            starts = ", ".join(now.follows) or "none"
            raise ConfigError(f"{where}: init: previous: a {now.name} stage starts from a {now.name} stage or from "
                              f"{starts}, not from {before.name} (its UNet has {now.in_channels} input channels, the "
                              f"stage before's {before.in_channels})")
        return "widen"
    raise ConfigError(f"{where}: init: previous: a {now.name} stage cannot start from a {before.name} stage "
                      f"(different models)")
