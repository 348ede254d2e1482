"""Model families by ``model.kind``: one file each; a new family is a new file and one line here."""
from __future__ import annotations

from training.families.base import Family
from training.families.sd import SD
from training.families.sdxl import SDXL
from training.families.svd import SVD, SVDText

FAMILIES: dict[str, Family] = {f.name: f for f in (SD(), SDXL(), SVD(), SVDText())}


def get(kind: str) -> Family:
    try:
        return FAMILIES[kind]
    except KeyError:
        raise KeyError(f"unknown model.kind {kind!r}; known: {', '.join(sorted(FAMILIES))}") from None
