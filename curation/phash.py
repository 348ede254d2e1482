"""Perceptual hash (DCT pHash) per image, and exact / near duplicate removal within a run.

The hash follows Zauner's pHash (2010): 32x32 grayscale, 2-D DCT-II, the 8x8 lowest
frequencies compared with their median gives 64 bits. Near duplicates are pairs within a
Hamming distance; candidates come from multi-index hashing (Norouzi et al., 2012): split the
64 bits into ``d + 1`` bands, and any pair within distance ``d`` agrees exactly on one band.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from pipeline.contract.config import option
from pipeline.contract.media import open_image
from pipeline.contract.schema import HEIGHT, IMAGE, KEPT, KEY, PHASH, STATUS, WIDTH
from pipeline.contract.stage import Stage, active, column


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


_DCT32 = _dct_matrix(32)
_BITS = (np.uint64(1) << np.arange(63, -1, -1, dtype=np.uint64))


def phash_gray(gray32: np.ndarray) -> int:
    """64-bit pHash of a 32x32 grayscale array."""
    coeffs = _DCT32 @ gray32.astype(np.float64) @ _DCT32.T
    low = coeffs[:8, :8].reshape(-1)
    bits = low > np.median(low)
    return int(np.bitwise_or.reduce(_BITS[bits], initial=np.uint64(0)))


def phash_image(img: Image.Image) -> int:
    gray = img.convert("L").resize((32, 32), Image.Resampling.LANCZOS)
    return phash_gray(np.asarray(gray))


def phash_bytes(data: bytes) -> int:
    with open_image(data, draft=(64, 64), draft_mode="L") as img:   # 1/8 scale: the hash needs 32x32
        return phash_image(img)


def to_hex(h: int) -> str:
    return f"{h:016x}"


def hamming(a: int, b: int) -> int:
    return int(a ^ b).bit_count()


@dataclass
class PHashDedupConfig:
    max_distance: int = option(
        4,
        "Hamming distance (of 64 bits) at or below which two images are duplicates; 0 = exact hash only",
        min=0,
        max=16,
    )
    prefer: Literal["largest", "first"] = option(
        "largest", "which copy to keep: 'largest' (most pixels, then smallest key) or 'first' (smallest key)"
    )


def near_duplicate_pairs(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """All pairs (i, j), i < j, with Hamming distance <= ``max_distance``; shape (n_pairs, 2)."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    n = len(hashes)
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    n_bands = max_distance + 1
    edges = np.linspace(0, 64, n_bands + 1).round().astype(int)
    found = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        width = hi - lo
        band = (hashes >> np.uint64(64 - hi)) & np.uint64((1 << width) - 1)
        order = np.argsort(band, kind="stable")
        sorted_band = band[order]
        starts = np.flatnonzero(np.r_[True, sorted_band[1:] != sorted_band[:-1]])
        ends = np.r_[starts[1:], n]
        for s, e in zip(starts, ends, strict=True):
            if e - s < 2:
                continue
            members = np.sort(order[s:e])
            h = hashes[members]
            dist = np.bitwise_count(h[:, None] ^ h[None, :])
            ii, jj = np.nonzero(np.triu(dist <= max_distance, k=1))
            if len(ii):
                found.append(np.stack([members[ii], members[jj]], axis=1))
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(found), axis=0)


def _candidates(table: pa.Table) -> pa.Array:
    """Rows pHash dedup compares, found in Arrow: kept, with a hash."""
    if PHASH not in table.column_names or not pa.types.is_string(table.schema.field(PHASH).type):
        return pa.array(np.zeros(table.num_rows, bool))
    has = pc.fill_null(pc.greater(pc.utf8_length(table.column(PHASH)), 0), False)
    return pc.and_(pc.fill_null(pc.equal(table.column(STATUS), KEPT), False), has)


def dedup_hashes(hashes: np.ndarray, priority: np.ndarray, max_distance: int) -> np.ndarray:
    """``greedy_keep`` over the items, with identical hashes collapsed first: each distinct hash
    is one group, ranked by its best member; the greedy pass runs over the groups, a group's other
    members are duplicates of its best one, and a group found near a kept group is wholly a
    duplicate of that group's best member. The same answer as over the items (a group's best
    member is visited first and decides for all of them), but the pair search sees each hash once:
    a web crawl holds thousands of copies of one image, and their pairs grow with the square of
    the copies (10^5 copies of 64 images took 20 GB here before)."""
    n = len(hashes)
    rank = np.empty(n, dtype=np.int64)
    rank[priority] = np.arange(n)
    uniq, group = np.unique(np.asarray(hashes, dtype=np.uint64), return_inverse=True)
    best = np.full(len(uniq), n, dtype=np.int64)
    np.minimum.at(best, group, rank)                  # each group's best rank
    rep = priority[best]                              # ... and the item holding it
    g_dup = greedy_keep(np.argsort(best, kind="stable"), near_duplicate_pairs(uniq, max_distance))
    dup_of = np.where(g_dup[group] >= 0, rep[np.maximum(g_dup[group], 0)], rep[group])
    dup_of[rep[g_dup < 0]] = -1                       # a kept group's best member is kept
    return dup_of


def greedy_keep(priority: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """For each item the index of the kept item it duplicates, or -1 if kept.

    Items are visited in ``priority`` order (a permutation, best first); an item is a duplicate
    of the best-ranked already-kept neighbour. Unlike connected components, this never chains
    A~B~C into "C duplicates A" when A and C are far apart.
    """
    n = len(priority)
    rank = np.empty(n, dtype=np.int64)
    rank[priority] = np.arange(n)
    neighbours: dict[int, list[int]] = {}
    for a, b in pairs.tolist():
        neighbours.setdefault(a, []).append(b)
        neighbours.setdefault(b, []).append(a)
    dup_of = np.full(n, -1, dtype=np.int64)
    for item in priority.tolist():
        best = -1
        for other in neighbours.get(item, ()):
            if rank[other] < rank[item] and dup_of[other] == -1 and (best == -1 or rank[other] < rank[best]):
                best = other
        dup_of[item] = best
    return dup_of


class PHashDedup(Stage):
    """Per image: the 64-bit pHash (``phash``, hex). Per run: reject exact and near duplicates."""

    name = "phash_dedup"
    Config = PHashDedupConfig
    num_cpus = 1.0      # same as decode, so Ray fuses the stages into one task
    batch_size = 16
    after = ("decode",)

    def __init__(self, config: PHashDedupConfig | None = None):
        super().__init__(config or PHashDedupConfig())

    def __call__(self, batch):
        keep = active(batch)
        out = column(batch, PHASH)
        images = batch.get(IMAGE)
        for i in range(len(keep)):
            if keep[i] and images is not None and images[i] is not None:
                out[i] = to_hex(phash_bytes(images[i]))
        return batch

    def reduce(self, rows) -> dict[str, tuple[str, str | None]]:
        table = rows.table([PHASH, STATUS, WIDTH, HEIGHT], where=_candidates)
        if table is None or PHASH not in table.column_names:
            return {}
        cols = table.to_pydict()
        idx = list(range(table.num_rows))
        if len(idx) < 2:
            return {}
        keys = [cols[KEY][i] for i in idx]
        hashes = np.array([int(cols[PHASH][i], 16) for i in idx], dtype=np.uint64)
        if self.config.prefer == "largest":
            pixels = [-(cols[WIDTH][i] or 0) * (cols[HEIGHT][i] or 0) for i in idx]
            priority = np.array(sorted(range(len(idx)), key=lambda j: (pixels[j], keys[j])))
        else:
            priority = np.array(sorted(range(len(idx)), key=lambda j: keys[j]))
        dup_of = dedup_hashes(hashes, priority, self.config.max_distance)
        result = {}
        for j in np.flatnonzero(dup_of >= 0).tolist():
            other = int(dup_of[j])
            dist = hamming(int(hashes[j]), int(hashes[other]))
            result[keys[j]] = (f"duplicate: phash distance {dist} to {keys[other]}", keys[other])
        return result


__all__ = [
    "PHashDedup",
    "PHashDedupConfig",
    "dedup_hashes",
    "greedy_keep",
    "near_duplicate_pairs",
    "phash_bytes",
    "phash_image",
]
