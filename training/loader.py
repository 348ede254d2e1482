"""The bucketed loader: the schedule's batches for one rank, decoded ahead by a thread pool.

Each step's samples come from ``Schedule`` (one bucket per global batch, this rank's slice), so
the loader is stateless apart from its ``Cursor``: ``state()`` is the cursor after the last batch
handed out, which a checkpoint stores and a resumed run passes back. Samples are fetched by one
ranged read from their shard (offset and size from the index), decoded with PIL (JPEG draft mode
skips most of the work for large images), resized to cover the bucket and cropped. A random crop
draws from a generator seeded by (seed, epoch, sample), so a resumed run crops exactly as the
uninterrupted one would. Decoding releases the GIL, so threads overlap with the training step.
"""
from __future__ import annotations

import collections
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from pipeline.contract import storage
from pipeline.contract.media import open_image
from training.buckets import Bucket, plan_crop
from training.index import Strings
from training.objectives import sdxl_time_ids
from training.schedule import Cursor, Schedule, rank_slice, seeded_rng


@dataclass
class Batch:
    pixels: torch.Tensor | None   # (B, 3, H, W) float32 in [-1, 1]; None when read from the latent cache
    captions: list[str]
    time_ids: torch.Tensor        # (B, 6): original (h, w), crop top-left (top, left), target (h, w)
    ids: list[int]                # sample ids (index rows)
    bucket: int
    epoch: int
    latents: torch.Tensor | None = None   # cached (B, 2, C, h, w): posterior mean and std
    context: torch.Tensor | None = None   # cached (B, 77, D) text context
    pooled: torch.Tensor | None = None    # cached (B, P) pooled text embedding (SDXL)


class SampleReader:
    """Ranged reads from shards; one open file per shard per thread.

    Shards on an object store are read by one range request per sample. A request's latency is the
    store's, not the CPU's, so ``prefetch`` starts the reads of the batches the loader has planned
    on ``io_threads`` threads of their own (many requests in flight, the decode threads busy with
    pixels); ``read`` then takes the bytes that arrived.

    When every shard on a store fits in ``copy_bytes`` together, each is also copied whole into
    this node's scratch folder in the background (one streamed GET per shard, ``copy_threads`` at a
    time) and a sample whose shard has arrived is read from the copy: after the first pass an epoch
    makes no request at all. When they do not all fit, nothing is copied (a partial cache under a
    global shuffle would fetch a whole shard for one sample and evict it again), and every read
    stays one range request. The copies are removed by ``close``."""

    def __init__(self, index: pa.Table, io_threads: int = 16, copy_bytes: int = 0, copy_threads: int = 4):
        self.shard = Strings(index.column("shard"), dictionary=True)
        self.offset = index.column("offset").to_numpy()
        self.size = index.column("size").to_numpy()
        self._local = threading.local()
        remote = any(storage.is_url(s) for s in self.shard.distinct())
        self._io = ThreadPoolExecutor(io_threads, thread_name_prefix="winnow-fetch") if remote else None
        self._ahead: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._copies: dict[str, str] = {}          # shard URL -> its complete copy in scratch
        self._copier, self._scratch = None, None
        self.copy_plan = self._plan_copies(copy_bytes) if remote else {"shards": 0, "bytes": 0, "copied": False}
        if self.copy_plan["copied"]:
            self._scratch = storage.scratch("winnow-shards-")
            folder = self._scratch.__enter__()
            self._copier = ThreadPoolExecutor(max(1, copy_threads), thread_name_prefix="winnow-copy")
            for k, url in enumerate(self.copy_plan["urls"]):
                self._copier.submit(self._copy, url, os.path.join(folder, f"{k:06d}.tar"))

    def _plan_copies(self, budget: int) -> dict:
        """Which shards to copy whole: all of the store's, when their bytes (to the end of their last
        sample) fit in ``budget``; else none."""
        ends: dict[str, int] = {}
        last = np.full(len(self.shard.values), -1, np.int64)           # each shard's end, by its code
        np.maximum.at(last, self.shard.codes, self.offset.astype(np.int64) + self.size.astype(np.int64))
        for path, end in zip(self.shard.values, last.tolist(), strict=True):
            if storage.is_url(path) and end >= 0:
                ends[path] = end
        total = sum(ends.values())
        return {"shards": len(ends), "bytes": total, "copied": 0 < total <= budget, "urls": sorted(ends)}

    def _copy(self, url: str, dest: str) -> None:
        storage.download(url, dest)
        with self._lock:
            self._copies[url] = dest

    def copied(self) -> int:
        """How many shards have a complete copy in scratch so far."""
        with self._lock:
            return len(self._copies)

    def prefetch(self, ids: list[int]) -> None:
        """Start fetching these samples' bytes (shards on a store only; local reads need no help)."""
        if self._io is None:
            return
        with self._lock:
            for i in ids:
                if i not in self._ahead and self.shard[i] not in self._copies:
                    self._ahead[i] = self._io.submit(self._fetch, i)

    def read(self, i: int) -> bytes:
        with self._lock:
            ahead = self._ahead.pop(i, None)
        return ahead.result() if ahead is not None else self._fetch(i)

    def close(self) -> None:
        if self._io is not None:
            self._io.shutdown(wait=False, cancel_futures=True)
            self._ahead.clear()
        if self._copier is not None:        # a copy under way finishes before its folder goes
            self._copier.shutdown(wait=True, cancel_futures=True)
            self._copier = None
        if self._scratch is not None:
            self._scratch.__exit__(None, None, None)
            self._scratch = None

    def _fetch(self, i: int) -> bytes:
        files = getattr(self._local, "files", None)
        if files is None:
            files = self._local.files = collections.OrderedDict()
        path = self.shard[i]
        with self._lock:
            copy = self._copies.get(path)
        key = copy or path
        fh = files.pop(key, None)
        if fh is None:                       # a local copy, or one range request per sample on the store
            fh = open(copy, "rb") if copy else storage.open_read(path, ranged=True)
        files[key] = fh
        while len(files) > 8:
            files.popitem(last=False)[1].close()
        fh.seek(int(self.offset[i]))
        return fh.read(int(self.size[i]))


def load_image(
    data: bytes, bucket: Bucket, rng: np.random.Generator | None
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """(uint8 HxWx3 array of the bucket's size, (orig_h, orig_w, top, left) of the crop)."""
    seen = []

    def draft(w: int, h: int) -> tuple[int, int]:      # JPEGs decode at a reduced scale >= the target
        seen.append((w, h, plan_crop(w, h, bucket, rng)))
        return seen[0][2].resize_w, seen[0][2].resize_h

    with open_image(data, draft=draft) as im:
        rgb = im.convert("RGB")
    width, height, crop = seen[0]
    box = (crop.left, crop.top, crop.left + bucket.width, crop.top + bucket.height)
    if rgb.size != (crop.resize_w, crop.resize_h):
        sx, sy = rgb.width / crop.resize_w, rgb.height / crop.resize_h
        rgb = rgb.resize((bucket.width, bucket.height), Image.BICUBIC,
                         box=(box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy))
    else:
        rgb = rgb.crop(box)
    return np.asarray(rgb, dtype=np.uint8), (height, width, crop.top, crop.left)


class BucketLoader:
    """Iterate this rank's batches from ``cursor`` on, across epochs, forever."""

    def __init__(self, index: pa.Table, buckets: list[Bucket], bucket_of: np.ndarray, cursor: Cursor, batch_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, random_crop: bool = True, workers: int = 4,
                 prefetch: int = 2, cache=None, shard_copy_bytes: int = 0, mix=None):
        self.cache = cache            # a training.cache.LatentCache: serve cached latents, no decoding
        self.mix = mix                # a training.captions.CaptionMix: several caption columns, drawn per epoch
        self.buckets, self.bucket_of = buckets, np.asarray(bucket_of)
        self.schedule = self._schedule(seed)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.cursor = Schedule.start(cursor, self._global_batch())
        self.seed, self.random_crop = seed, random_crop
        self.reader = SampleReader(index, copy_bytes=shard_copy_bytes)
        self.captions = Strings(index.column("caption"))
        self._columns(index)
        self.pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="winnow-decode")
        self.prefetch = max(1, prefetch)
        self.wait_s = 0.0            # time the consumer waited for a batch

    def _schedule(self, seed: int) -> Schedule:
        return Schedule(self.bucket_of, seed)

    def _global_batch(self) -> int:
        return self.batch_size * self.world_size

    def _columns(self, index: pa.Table) -> None:
        self.original = np.stack([index.column("original_height").to_numpy(),
                                  index.column("original_width").to_numpy()], axis=1)
        self.stored = np.stack([index.column("height").to_numpy(), index.column("width").to_numpy()], axis=1)

    def state(self) -> Cursor:
        return self.cursor

    def _plan(self):
        cursor, empty = self.cursor, 0
        while True:
            batches = self.schedule.batches(cursor)
            for gb in batches:
                cursor = Schedule.advance(cursor)
                if self.mix is not None:      # the whole global batch: the same counts on every rank
                    cursor.captions = self.mix.count(cursor.captions, gb, cursor.epoch)
                yield cursor, gb
            empty = 0 if batches else empty + 1
            if empty > 1:
                raise RuntimeError(f"no bucket holds a global batch of {self.batch_size * self.world_size} samples; "
                                   f"lower train.batch_size or ray.num_workers, or add data")
            cursor = self.schedule.next_epoch(cursor)

    def _sample(self, i: int, epoch: int) -> tuple:
        bucket = self.buckets[int(self.bucket_of[i])]
        if self.cache is not None:
            top, left = self.cache.crop_ids(int(self.stored[i][1]), int(self.stored[i][0]), bucket)
            return self.cache.get(i), (int(self.original[i][0]), int(self.original[i][1]), top, left)
        rng = seeded_rng(self.seed, "crop", epoch, i) if self.random_crop else None
        try:
            pixels, (_, _, top, left) = load_image(self.reader.read(i), bucket, rng)
        except Exception as exc:
            raise RuntimeError(f"sample {i} ({self.reader.shard[i]} @ {self.reader.offset[i]}): {exc}") from exc
        return pixels, (int(self.original[i][0]), int(self.original[i][1]), top, left)

    def texts(self, ids: list[int], epoch: int) -> list[str]:
        """The captions of samples ``ids`` in ``epoch``: the index's, or the mix's draw."""
        if self.mix is None:
            return [self.captions[i] for i in ids]
        return [self.mix.pick(i, epoch)[0] for i in ids]

    def _submit(self, cursor: Cursor, gb: list[int]) -> tuple[Cursor, list[int], list[Future]]:
        mine = rank_slice(gb, self.rank, self.world_size)
        if self.cache is None:
            self.reader.prefetch(mine)
        return cursor, mine, [self.pool.submit(self._sample, i, cursor.epoch) for i in mine]

    def __iter__(self):
        plan = self._plan()
        pending: collections.deque = collections.deque()
        try:
            while True:
                while len(pending) < self.prefetch:
                    pending.append(self._submit(*next(plan)))
                cursor, ids, futures = pending.popleft()
                t = time.perf_counter()
                done = [f.result() for f in futures]
                self.wait_s += time.perf_counter() - t
                self.cursor = cursor
                yield self._assemble(cursor, ids, done)
        finally:
            for _, _, futures in pending:
                for f in futures:
                    f.cancel()

    def _assemble(self, cursor: Cursor, ids: list[int], done: list) -> Batch:
        bucket = self.buckets[int(self.bucket_of[ids[0]])]
        time_ids = torch.tensor([sdxl_time_ids(d[1][:2], d[1][2:], (bucket.height, bucket.width)) for d in done],
                                dtype=torch.float32)
        batch = Batch(None, self.texts(ids, cursor.epoch), time_ids, ids, int(self.bucket_of[ids[0]]), cursor.epoch)
        if self.cache is None:
            batch.pixels = (
                torch.from_numpy(np.stack([d[0] for d in done])).permute(0, 3, 1, 2).float().div_(127.5).sub_(1)
            )
        else:
            batch.latents = torch.from_numpy(np.stack([d[0][0] for d in done])).float()
            batch.context = torch.from_numpy(np.stack([d[0][1] for d in done])).float()
            if done[0][0][2] is not None:
                batch.pooled = torch.from_numpy(np.stack([d[0][2] for d in done])).float()
        return batch

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.reader.close()
        if self.cache is not None:
            self.cache.close()


@dataclass
class ClipBatch:
    frames: torch.Tensor          # (B, F, 3, H, W) float32 in [-1, 1]
    fps: torch.Tensor             # (B,) the rate the frames were sampled at
    motion_bucket_id: torch.Tensor  # (B,) from the run's motion-bucket map
    captions: list[str]
    ids: list[int]                # clip ids (clip-index rows)
    bucket: int
    epoch: int


class ClipLoader(BucketLoader):
    """The same schedule, cursor and prefetching over clips: video buckets, each with its own batch
    size per rank (the cursor's global batch is the world size), N frames sampled per clip by
    ``training.video_frames`` from a start seeded by (seed, epoch, clip). Clips no bucket can hold
    (``bucket_of`` -1) are never drawn; ``skipped`` counts them."""

    def __init__(self, index: pa.Table, buckets: list, bucket_of: np.ndarray, cursor: Cursor, rank: int = 0,
                 world_size: int = 1, seed: int = 0, random_crop: bool = True, workers: int = 4, prefetch: int = 2,
                 target_fps: float = 7.0, min_fps: float = 3.0, max_fps: float = 30.0, motion_ids=None,
                 shard_copy_bytes: int = 0, mix=None):
        self.target_fps, self.min_fps, self.max_fps = target_fps, min_fps, max_fps
        self.motion_ids = np.asarray(motion_ids if motion_ids is not None else np.full(index.num_rows, 127), np.int64)
        self.skipped = int((np.asarray(bucket_of) < 0).sum())
        super().__init__(index, buckets, bucket_of, cursor, 1, rank, world_size, seed, random_crop, workers, prefetch,
                         shard_copy_bytes=shard_copy_bytes, mix=mix)

    def _schedule(self, seed: int) -> Schedule:
        return Schedule(self.bucket_of, seed, {k: b.batch for k, b in enumerate(self.buckets)})

    def _global_batch(self) -> int:
        return self.world_size

    def _columns(self, index: pa.Table) -> None:
        self.clip_fps = index.column("fps").to_numpy()
        self.duration = index.column("duration_s").to_numpy()

    def _sample(self, i: int, epoch: int) -> tuple:
        from training.video_frames import decode_frames, plan_frames, to_bucket

        bucket = self.buckets[int(self.bucket_of[i])]
        try:
            plan = plan_frames(0.0, float(self.duration[i]), float(self.clip_fps[i]), bucket.frames, self.target_fps,
                               self.min_fps, self.max_fps, seeded_rng(self.seed, "frames", epoch, i))
            frames, _ = decode_frames(self.reader.read(i), plan.times)
            rng = seeded_rng(self.seed, "crop", epoch, i) if self.random_crop else None
            pixels, _ = to_bucket(frames, bucket.frame, rng)
        except Exception as exc:
            raise RuntimeError(f"clip {i} ({self.reader.shard[i]} @ {self.reader.offset[i]}): {exc}") from exc
        return pixels, plan.fps

    def _assemble(self, cursor: Cursor, ids: list[int], done: list) -> ClipBatch:
        frames = torch.from_numpy(np.stack([d[0] for d in done])).permute(0, 1, 4, 2, 3).float().div_(127.5).sub_(1)
        return ClipBatch(frames, torch.tensor([d[1] for d in done], dtype=torch.float32),
                         torch.from_numpy(self.motion_ids[ids]), self.texts(ids, cursor.epoch), ids,
                         int(self.bucket_of[ids[0]]), cursor.epoch)


__all__ = ["Batch", "BucketLoader", "ClipBatch", "ClipLoader", "SampleReader", "load_image"]
