"""Semantic near-duplicates: CLIP image embeddings closer than a cosine threshold, within a run.

Follows SemDeDup (Abbas et al., 2023): cluster the embeddings with spherical k-means, then
compare pairs only inside each cluster. Embeddings stream from the annotation fragments to one
file per cluster under the reduction's scratch folder, so memory holds the k-means sample and
one cluster at a time, never the whole run. A run smaller than ``cluster_size`` is one cluster:
every pair is compared, exactly. Pairs split across two clusters are missed; the README gives
the recall measured against exact search. Within a cluster, the best-ranked copy is kept and
every other copy points at it (``duplicate_of``), with the same greedy rule as pHash dedup.
"""
from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from curation.phash import greedy_keep
from pipeline.contract.config import option
from pipeline.contract.schema import HEIGHT, IMAGE_EMBEDDING, KEPT, KEY, STATUS, WIDTH
from pipeline.contract.stage import Stage


@dataclass
class SemanticDedupConfig:
    threshold: float = option(0.95, "cosine similarity at or above which two images are duplicates", min=-1, max=1)
    cluster_size: int = option(20_000, "target rows per k-means cluster; a run with fewer rows compares every pair",
                               min=2)
    sample_size: int = option(100_000, "rows the k-means is fitted on", min=10)
    kmeans_iters: int = option(20, "k-means iterations", min=1)
    seed: int = option(0, "seed of the k-means initialisation")
    prefer: Literal["largest", "first"] = option("largest", "copy to keep: most pixels, or first key")


def embedding_matrix(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(rows x dim float32 matrix with zeros where null, boolean mask of rows that have one)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    valid = ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    if isinstance(arr.type, pa.FixedSizeListType):
        dim = arr.type.list_size
        flat = arr.values.to_numpy(zero_copy_only=False)[arr.offset * dim:(arr.offset + len(arr)) * dim]
        mat = np.asarray(flat, dtype=np.float32).reshape(len(arr), dim)
    else:
        rows = arr.to_pylist()
        dim = next((len(r) for r in rows if r is not None), 0)
        mat = np.array([r if r is not None else [0.0] * dim for r in rows], dtype=np.float32).reshape(len(rows), dim)
    mat = np.where(valid[:, None], np.nan_to_num(mat), 0.0).astype(np.float32)
    return mat, valid & (np.abs(mat).sum(axis=1) > 0)


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def spherical_kmeans(x: np.ndarray, k: int, iters: int, seed: int) -> np.ndarray:
    """k unit-norm centroids of unit-norm rows ``x`` (cosine k-means, k-means++ seeding)."""
    rng = np.random.default_rng(seed)
    n = len(x)
    centroids = [x[rng.integers(n)]]
    best = x @ centroids[0]
    for _ in range(1, k):
        dist = np.clip(1.0 - best, 0.0, None)
        total = float(dist.sum())
        pick = rng.choice(n, p=dist / total) if total > 0 else rng.integers(n)
        centroids.append(x[pick])
        best = np.maximum(best, x @ x[pick])
    c = np.stack(centroids)
    for _ in range(iters):
        assign = np.argmax(x @ c.T, axis=1)
        sums = np.zeros_like(c)
        np.add.at(sums, assign, x)
        counts = np.bincount(assign, minlength=k)
        empty = counts == 0
        if empty.any():   # re-seed empty clusters with the rows farthest from their centroid
            far = np.argsort(np.einsum("ij,ij->i", x, c[assign]))[: int(empty.sum())]
            sums[empty] = x[far]
        c = _normalize(sums)
    return c


def similar_pairs(x: np.ndarray, threshold: float, block_elems: int = 1 << 24) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (i < j) with cosine >= threshold, computed in row blocks of bounded size."""
    n = len(x)
    step = max(1, block_elems // max(n, 1))
    pairs, sims = [], []
    for start in range(0, n, step):
        s = x[start:start + step] @ x.T
        i, j = np.nonzero(s >= threshold)
        i = i + start
        upper = i < j
        pairs.append(np.stack([i[upper], j[upper]], axis=1))
        sims.append(s[i[upper] - start, j[upper]])
    if not pairs:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.float32)
    return np.concatenate(pairs).astype(np.int64), np.concatenate(sims)


def key_fraction(key: str) -> float:
    """A stable pseudo-random number in [0, 1) per key: samples do not depend on file order."""
    return zlib.crc32(key.encode("utf-8")) / 2**32


class _ClusterFiles:
    """Append-only per-cluster files: float16 embeddings and 'key<TAB>pixels' lines."""

    def __init__(self, folder: str, dim: int):
        self.folder, self.dim = folder, dim

    def _paths(self, c: int) -> tuple[str, str]:
        return os.path.join(self.folder, f"c{c:06d}.f16"), os.path.join(self.folder, f"c{c:06d}.tsv")

    def append(self, c: int, keys: list[str], pixels: np.ndarray, emb: np.ndarray) -> None:
        emb_path, meta_path = self._paths(c)
        with open(emb_path, "ab") as fh:
            fh.write(np.ascontiguousarray(emb, dtype=np.float16).tobytes())
        with open(meta_path, "a", encoding="utf-8") as fh:
            fh.writelines(f"{k}\t{int(p)}\n" for k, p in zip(keys, pixels, strict=True))

    def load(self, c: int) -> tuple[list[str], np.ndarray, np.ndarray]:
        emb_path, meta_path = self._paths(c)
        if not os.path.exists(meta_path):
            return [], np.zeros(0), np.zeros((0, self.dim), dtype=np.float32)
        with open(meta_path, encoding="utf-8") as fh:
            lines = [ln.rstrip("\n").split("\t") for ln in fh]
        emb = np.fromfile(emb_path, dtype=np.float16).astype(np.float32).reshape(-1, self.dim)
        return [k for k, _ in lines], np.array([int(p) for _, p in lines]), _normalize(emb)


class SemanticDedup(Stage):
    """Run-level: reject images whose CLIP embedding is within ``threshold`` cosine of a kept one."""

    name = "semantic_dedup"
    Config = SemanticDedupConfig
    after = ("clip",)
    has_batch_work = False      # all of the work happens in ``reduce``, over the whole run

    @classmethod
    def notices(cls, config: SemanticDedupConfig, earlier: list[tuple[str, Any]]) -> list[str]:
        from curation.clip import ClipConfig, is_random

        clips = [c for n, c in earlier if n == "clip" and isinstance(c, ClipConfig)]
        if clips and is_random(clips[-1]):
            return ["semantic_dedup: compares the embeddings of a random CLIP, so the images it rejects as "
                    "duplicates need not be alike"]
        return []

    def __init__(self, config: SemanticDedupConfig | None = None):
        super().__init__(config or SemanticDedupConfig())

    def _stream(self, rows):
        """(keys, pixels, unit embeddings) of kept rows that have an embedding, chunk by chunk."""
        for table in rows.batches([IMAGE_EMBEDDING, STATUS, WIDTH, HEIGHT]):
            if IMAGE_EMBEDDING not in table.column_names:
                continue
            emb, valid = embedding_matrix(table.column(IMAGE_EMBEDDING))
            status = table.column(STATUS).to_pylist()
            keep = np.array([v and s == KEPT for v, s in zip(valid, status, strict=True)], dtype=bool)
            if not keep.any():
                continue
            idx = np.flatnonzero(keep)
            keys = table.column(KEY).to_pylist()
            w = table.column(WIDTH).to_pylist() if WIDTH in table.column_names else [0] * len(keys)
            h = table.column(HEIGHT).to_pylist() if HEIGHT in table.column_names else [0] * len(keys)
            yield ([keys[i] for i in idx], np.array([(w[i] or 0) * (h[i] or 0) for i in idx], dtype=np.int64),
                   _normalize(emb[idx]))

    def reduce(self, rows) -> dict[str, tuple[str, str | None]]:
        cfg = self.config
        n, dim = 0, 0
        for keys, _, emb in self._stream(rows):
            n, dim = n + len(keys), emb.shape[1]
        if n < 2:
            return {}
        k = math.ceil(n / cfg.cluster_size)
        centroids = None
        if k > 1:
            rate = min(1.0, cfg.sample_size / n)
            sample: list[tuple[str, np.ndarray]] = []
            for keys, _, emb in self._stream(rows):
                sample += [(kk, e) for kk, e in zip(keys, emb, strict=True) if key_fraction(kk) < rate]
            sample.sort(key=lambda t: t[0])
            x = np.stack([e for _, e in sample])
            centroids = spherical_kmeans(x, min(k, len(x)), cfg.kmeans_iters, cfg.seed)
        folder = os.path.join(rows.scratch or ".", "clusters")
        os.makedirs(folder, exist_ok=True)
        files = _ClusterFiles(folder, dim)
        used: set[int] = set()
        for keys, pixels, emb in self._stream(rows):
            assign = np.zeros(len(keys), dtype=np.int64) if centroids is None else np.argmax(emb @ centroids.T, axis=1)
            for c in np.unique(assign).tolist():
                m = assign == c
                files.append(c, [kk for kk, t in zip(keys, m, strict=True) if t], pixels[m], emb[m])
                used.add(c)
        result: dict[str, tuple[str, str | None]] = {}
        for c in sorted(used):
            result.update(self._dedup_cluster(*files.load(c)))
        return result

    def _dedup_cluster(self, keys: list[str], pixels: np.ndarray, emb: np.ndarray):
        if len(keys) < 2:
            return {}
        if self.config.prefer == "largest":
            priority = np.array(sorted(range(len(keys)), key=lambda j: (-pixels[j], keys[j])))
        else:
            priority = np.array(sorted(range(len(keys)), key=lambda j: keys[j]))
        pairs, _ = similar_pairs(emb, self.config.threshold)
        dup_of = greedy_keep(priority, pairs)
        out = {}
        for j in np.flatnonzero(dup_of >= 0).tolist():
            other = int(dup_of[j])
            sim = float(emb[j] @ emb[other])
            out[keys[j]] = (f"duplicate: clip cosine {sim:.3f} to {keys[other]}", keys[other])
        return out


__all__ = ["SemanticDedup", "SemanticDedupConfig", "embedding_matrix", "similar_pairs", "spherical_kmeans"]
