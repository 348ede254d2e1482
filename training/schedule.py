"""A seeded global batch schedule every rank agrees on, with an exact, world-size-proof cursor.

Per epoch: each bucket's samples are shuffled with a seed derived from (seed, epoch, bucket),
after the ones the previous epoch carried over; each bucket is cut into *global* batches of
``global_batch`` samples; the order of all global batches is shuffled; rank ``r`` of ``W``
takes slice ``[r * B, (r + 1) * B)`` of each. Every rank therefore trains on the same bucket at
the same step (kohya gives each rank its own). A bucket's leftover, smaller than a global batch,
is carried to the next epoch and counted, never dropped.

The loader's state (``Cursor``) is the epoch, the samples carried into it, and the list of
(global batch size, batches done) segments of the epoch so far. Resuming rebuilds the epoch's
pools, replays each segment's cut to remove what was consumed, and cuts the rest with the
current global batch size: a world-size change remaps the remaining samples, it neither replays
nor skips any.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field

import numpy as np


def seeded_rng(*parts: int | str) -> np.random.Generator:
    """A generator seeded by the parts (seed, what, step, rank ...): the same parts, the same draws, on any machine."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


@dataclass
class Cursor:
    """Where the loader is; JSON-serialisable, saved in every checkpoint."""

    epoch: int = 0
    carry: list[int] = field(default_factory=list)              # sample ids carried into this epoch
    segments: list[list[int]] = field(default_factory=list)     # [global_batch, batches done] so far
    captions: dict[str, int] = field(default_factory=dict)      # data.captions: samples per caption column so far

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if not self.captions:          # no caption mix: the cursor reads as before it had one
            d.pop("captions")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Cursor:
        return cls(int(d["epoch"]), [int(x) for x in d["carry"]], [[int(a), int(b)] for a, b in d["segments"]],
                   {str(k): int(v) for k, v in (d.get("captions") or {}).items()})


class Schedule:
    """The global schedule over samples ``0..n-1`` whose buckets are ``buckets[i]``."""

    def __init__(self, buckets: np.ndarray, seed: int = 0, batch_of: dict[int, int] | None = None):
        """``batch_of``: per bucket, a multiplier of the cursor's global batch (video buckets each
        have their own batch size: the cursor then holds the world size, and a global batch of
        bucket ``b`` is ``world x batch_of[b]``). Without it every bucket's global batch is the cursor's."""
        self.buckets = np.asarray(buckets, dtype=np.int64)
        self.seed = seed
        self.bucket_ids = sorted(b for b in set(self.buckets.tolist()) if b >= 0)   # -1: in no bucket, never drawn
        self.batch_of = batch_of or {}

    # ---- one epoch ----

    def pools(self, epoch: int, carry: list[int]) -> dict[int, list[int]]:
        """Per bucket, this epoch's samples in order: the ones carried in first, then a fresh
        shuffle of the others, so each sample is in every epoch exactly once."""
        carried: dict[int, list[int]] = {}
        for s in carry:
            carried.setdefault(int(self.buckets[s]), []).append(int(s))
        out = {}
        for b in self.bucket_ids:
            first = carried.get(b, [])
            ids = np.flatnonzero(self.buckets == b)
            if first:
                ids = np.setdiff1d(ids, first)
            out[b] = first + seeded_rng(self.seed, epoch, b).permutation(ids).tolist()
        return out

    def cut(self, pools: dict[int, list[int]], global_batch: int, epoch: int, salt: int) -> list[list[int]]:
        """Global batches of ``global_batch`` from one bucket each, in a seeded shuffled order."""
        batches = []
        for b in self.bucket_ids:
            pool = pools.get(b, [])
            size = global_batch * self.batch_of.get(b, 1)
            for i in range(0, len(pool) - size + 1, size):
                batches.append(pool[i:i + size])
        order = seeded_rng(self.seed, epoch, "order", salt, global_batch).permutation(len(batches))
        return [batches[i] for i in order]

    def remaining(self, cursor: Cursor, segments: int | None = None) -> dict[int, list[int]]:
        """The pools of ``cursor.epoch`` minus every batch its (first ``segments``) segments consumed."""
        pools = self.pools(cursor.epoch, cursor.carry)
        for salt, (g, done) in enumerate(cursor.segments[:segments]):
            used = {s for batch in self.cut(pools, g, cursor.epoch, salt)[:done] for s in batch}
            pools = {b: [s for s in p if s not in used] for b, p in pools.items()}
        return pools

    def batches(self, cursor: Cursor) -> list[list[int]]:
        """The rest of the cursor's epoch: global batches at the open segment's size."""
        g, done = cursor.segments[-1]
        salt = len(cursor.segments) - 1
        return self.cut(self.remaining(cursor, salt), g, cursor.epoch, salt)[done:]

    # ---- moving the cursor ----

    @staticmethod
    def start(cursor: Cursor, global_batch: int) -> Cursor:
        """Open a segment at this global batch size (a new run, or a resume at another size)."""
        segs = [list(x) for x in cursor.segments]
        if segs and segs[-1][0] == global_batch:
            pass
        elif segs and segs[-1][1] == 0:
            segs[-1] = [global_batch, 0]
        else:
            segs.append([global_batch, 0])
        return Cursor(cursor.epoch, list(cursor.carry), segs, dict(cursor.captions))

    @staticmethod
    def advance(cursor: Cursor, steps: int = 1) -> Cursor:
        segs = [list(x) for x in cursor.segments]
        segs[-1][1] += steps
        return Cursor(cursor.epoch, list(cursor.carry), segs, dict(cursor.captions))

    def next_epoch(self, cursor: Cursor) -> Cursor:
        """After the epoch's last global batch: the next epoch, carrying the leftovers."""
        left = self.remaining(cursor)
        carry = [x for b in self.bucket_ids for x in left.get(b, [])]
        return Cursor(cursor.epoch + 1, carry, [[cursor.segments[-1][0], 0]], dict(cursor.captions))


def rank_slice(batch: list[int], rank: int, world_size: int) -> list[int]:
    per = len(batch) // world_size
    return batch[rank * per:(rank + 1) * per]


__all__ = ["Cursor", "Schedule", "rank_slice", "seeded_rng"]
