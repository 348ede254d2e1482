"""Training on a mix of captions (``data.captions``): per sample and epoch, one of the caption
columns drawn with stated weights, as DALL-E 3 (Betker et al., 2023: 95 % synthetic, 5 % original)
and the SVD paper (CoCa, V-BLIP and an LLM summary) mixed synthetic and source text.

The draw for a sample is a function of (``train.seed``, epoch, the sample's key) alone, so a resumed
run and a run on another world size give every sample the same text. Where the drawn column is empty
for a sample, the first non-empty column of ``data.caption_fallback`` stands in (and that is what
the counts record). The loader counts the columns over every global batch it plans into the cursor
(``Cursor.captions``), which each checkpoint stores: the mix a run saw so far is in its checkpoint.

A mix of one column is resolved once, before training: the index's ``caption`` column becomes that
text (fallbacks applied), so the latent cache and validation see it too.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np
import pyarrow as pa

from pipeline.contract.config import ConfigError
from pipeline.contract.schema import CAPTION, CAPTION_COLUMNS

COLUMNS = (CAPTION, *CAPTION_COLUMNS)
ALIASES = {"original": CAPTION}
DEFAULT_FALLBACK = ["caption_summary", "caption_vlm", "caption_coca", "caption"]


def normalise(weights: dict, key: str = "data.captions") -> dict[str, float]:
    """``{column: weight}`` with aliases resolved and checked (ConfigError otherwise)."""
    out: dict[str, float] = {}
    for name, w in (weights or {}).items():
        col = ALIASES.get(str(name), str(name))
        if col not in COLUMNS:
            raise ConfigError(f"{key}: {name!r} is not a caption column; give weights for {', '.join(COLUMNS)} "
                              f"(original = caption)")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ConfigError(f"{key}.{name}: weight {w!r} must be a number >= 0")
        out[col] = out.get(col, 0.0) + float(w)
    if weights and sum(out.values()) <= 0:
        raise ConfigError(f"{key}: the weights sum to 0; give at least one column a positive weight")
    return {c: w for c, w in out.items() if w > 0}


def check(weights: dict, fallback: list[str], cache: bool) -> None:
    mix = normalise(weights)
    bad = [f for f in fallback if ALIASES.get(f, f) not in COLUMNS]
    if bad:
        raise ConfigError(f"data.caption_fallback: {bad} are not caption columns ({', '.join(COLUMNS)})")
    if cache and len(mix) > 1:
        raise ConfigError("data.cache: the latent cache encodes one caption per sample; a mix of several columns "
                          "in data.captions needs the text encoded every step (set data.cache: false, or give one "
                          "column)")


def _unit(seed: int, epoch: int, key: str) -> float:
    digest = hashlib.blake2b(f"{seed}:{epoch}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64


class CaptionMix:
    """The columns of an index and the draw among them."""

    def __init__(self, index: pa.Table, weights: dict, fallback: list[str], seed: int):
        mix = normalise(weights)
        self.columns = list(mix)
        total = sum(mix.values())
        self.cumulative = np.cumsum([mix[c] / total for c in self.columns])
        self.fallback = [ALIASES.get(f, f) for f in fallback]
        names = set(self.columns) | set(self.fallback)
        from training.index import Strings

        empty = pa.nulls(index.num_rows, pa.string())
        self.text = {c: Strings(index.column(c) if c in index.column_names else empty) for c in names}
        self.keys = Strings(index.column("key"))
        self.seed = seed

    @classmethod
    def missing(cls, index: pa.Table, weights: dict) -> list[str]:
        """Columns with a weight that no row of ``index`` has text in."""
        out = []
        for c in normalise(weights):
            if c not in index.column_names or not any(index.column(c).to_pylist()):
                out.append(c)
        return out

    def pick(self, i: int, epoch: int) -> tuple[str, str]:
        """(text, the column it came from) for index row ``i`` in ``epoch``; ('', 'none') when every
        column is empty."""
        if len(self.columns) == 1:
            drawn = self.columns[0]
        else:
            drawn = self.columns[min(int(np.searchsorted(self.cumulative, _unit(self.seed, epoch, self.keys[i]),
                                                         side="right")), len(self.columns) - 1)]
        for col in [drawn, *self.fallback]:
            t = self.text[col][i]
            if t:
                return t, col
        return "", "none"

    def count(self, counts: dict[str, int], ids, epoch: int) -> dict[str, int]:
        out = dict(counts)
        for i in ids:
            col = self.pick(int(i), epoch)[1]
            out[col] = out.get(col, 0) + 1
        return out


def resolve_static(index: pa.Table, weights: dict, fallback: list[str], seed: int) -> tuple[pa.Table, dict]:
    """A one-column mix: the index with ``caption`` replaced by that column's text (fallbacks
    applied), and the counts per column that supplied it."""
    mix = CaptionMix(index, weights, fallback, seed)
    picked = [mix.pick(i, 0) for i in range(index.num_rows)]
    counts: dict[str, int] = {}
    for _, col in picked:
        counts[col] = counts.get(col, 0) + 1
    pos = index.column_names.index(CAPTION)
    return index.set_column(pos, CAPTION, pa.array([t for t, _ in picked], pa.string())), counts


def for_loader(spec, index: pa.Table) -> CaptionMix | None:
    """The loader's mix: None unless ``data.captions`` weighs several columns."""
    weights = normalise(spec.data.captions)
    if len(weights) < 2:
        return None
    return CaptionMix(index, weights, spec.data.caption_fallback, spec.train.seed)


__all__ = ["COLUMNS", "CaptionMix", "DEFAULT_FALLBACK", "check", "for_loader", "normalise", "resolve_static"]
