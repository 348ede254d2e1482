"""Precomputed VAE latents and text embeddings (``data.cache: true``).

The VAE encoder and the text encoders are frozen, so their outputs for a given crop and caption
never change: computing them once, in a Ray Data pass before training, removes most of a step's
non-UNet work (MosaicML's largest single saving when training SD 2 from scratch). The cost is one
fixed crop per sample, so a cached run uses the centre crop.

Layout (``OUTPUT/cache/<fingerprint>/``), NumPy files opened as memory maps so a worker reads
only the rows it trains on:

* ``latents_<W>x<H>.npy`` per bucket: ``(n, 2, C, H/8, W/8)`` float16, the posterior's mean and
  std (each step still draws its own latent sample, as uncached training does);
* ``context.npy`` ``(N, 77, D)`` and, for SDXL, ``pooled.npy`` ``(N, P)`` float16;
* ``empty.npy`` / ``empty_pooled.npy``: the empty caption, for caption dropout;
* ``blocks/<i>.done`` per finished block (a killed pass resumes) and ``done.json`` at the end.

With the output on an object store (no shared file to map, no writes in place) each block is one
object instead, ``blocks/<i>.npz`` (its rows' latents per bucket, context and pooled embeddings;
NumPy's format, read without pickle), written whole by the actor that encoded it, so its presence
is the block's done marker; ``done.json`` follows the last one. A training worker then copies the
blocks into its node's scratch folder and fills the same memory-mapped files there
(``LatentCache``), removed when its loader closes.
"""
from __future__ import annotations

import io
import json
import os

import fsspec
import numpy as np
import pyarrow as pa

from pipeline.contract import layout, storage
from pipeline.contract.layout import TrainRun
from training.buckets import Bucket, plan_crop

BLOCK_ROWS = 64
VERSION = 1


class Layout:
    """Where every sample's rows live in the cache files."""

    def __init__(self, folder: str, buckets: list[Bucket], bucket_of: np.ndarray, dims: dict):
        self.folder, self.buckets, self.dims = folder, buckets, dims
        self.bucket_of = np.asarray(bucket_of)
        self.pos = np.zeros(len(self.bucket_of), np.int64)
        self.counts = np.bincount(self.bucket_of, minlength=len(buckets))
        for b in range(len(buckets)):
            ids = np.flatnonzero(self.bucket_of == b)
            self.pos[ids] = np.arange(len(ids))

    def latents_path(self, b: int) -> str:
        return os.path.join(self.folder, f"latents_{self.buckets[b].width}x{self.buckets[b].height}.npy")

    def latent_shape(self, b: int) -> tuple:
        bk = self.buckets[b]
        return (int(self.counts[b]), 2, self.dims["latent_channels"], bk.height // 8, bk.width // 8)

    def create(self) -> None:
        """Allocate the files once (a resumed pass reuses them)."""
        n, t = len(self.bucket_of), self.dims["tokens"]
        files = [(self.latents_path(b), self.latent_shape(b)) for b in range(len(self.buckets)) if self.counts[b]]
        files.append((os.path.join(self.folder, "context.npy"), (n, t, self.dims["context"])))
        if self.dims["pooled"]:
            files.append((os.path.join(self.folder, "pooled.npy"), (n, self.dims["pooled"])))
        for path, shape in files:
            if not os.path.exists(path):
                np.lib.format.open_memmap(path + ".tmp", mode="w+", dtype=np.float16, shape=shape).flush()
                os.replace(path + ".tmp", path)


class EncodeBlock:
    """Ray Data actor: encode a block of index rows into the cache files."""

    def __init__(self, spec: dict, folder: str, buckets: list[tuple[int, int]], bucket_of: np.ndarray, dims: dict,
                 device: str):
        import shutil
        import tempfile

        import torch

        from training import families

        m = spec["model"]
        scratch = tempfile.mkdtemp(prefix="winnow-cache-")
        self.family = families.get(m["kind"])
        try:                   # the preset's tokenizer passes through it and is read into memory
            self.comps = self.family.components(m["pretrained"], m["allow_download"], m["seed"], scratch, None)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        self.device = torch.device(device)
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        self.comps.vae.to(
            self.device, dtype=torch.float32 if self.comps.vae.config.get("force_upcast") else dtype
        ).eval()
        for enc in self.comps.encoders:
            enc.to(self.device, dtype=dtype).eval()
        self.layout = Layout(folder, [Bucket(w, h) for w, h in buckets], bucket_of, dims)
        self.on_store = storage.is_url(folder)
        self._maps: dict[str, np.ndarray] = {}
        self._write_empty()

    def _map(self, path: str) -> np.ndarray:
        if path not in self._maps:
            self._maps[path] = np.load(path, mmap_mode="r+")
        return self._maps[path]

    def _write_empty(self) -> None:
        ctx, pooled = self.family.encode_text(self.comps, [""], self.device)
        arrays = {"empty.npy": ctx[0]} if pooled is None else {"empty.npy": ctx[0], "empty_pooled.npy": pooled[0]}
        for name, value in arrays.items():
            buf = io.BytesIO()
            np.save(buf, value.float().cpu().numpy().astype(np.float16), allow_pickle=False)
            storage.write_once(storage.join(self.layout.folder, name), buf.getvalue())

    def __call__(self, batch: dict) -> dict:
        import torch

        from training.loader import load_image

        rows = batch["row"].astype(np.int64)
        lay = self.layout
        block: dict[str, np.ndarray] = {"rows": rows}      # on a store: the block's arrays, one object
        with torch.no_grad():
            for b in np.unique(lay.bucket_of[rows]):
                sel = np.flatnonzero(lay.bucket_of[rows] == b)
                pixels = []
                for j in sel:
                    with fsspec.open(str(batch["shard"][j]), "rb") as fh:
                        fh.seek(int(batch["offset"][j]))
                        data = fh.read(int(batch["size"][j]))
                    pixels.append(load_image(data, lay.buckets[int(b)], None)[0])
                x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float().div(127.5).sub(1)
                vae = self.comps.vae
                dist = vae.encode(x.to(self.device, next(vae.parameters()).dtype)).latent_dist
                out = torch.stack([dist.mean, dist.std], dim=1).float().cpu().numpy().astype(np.float16)
                if self.on_store:
                    block[f"latents_{int(b)}"], block[f"rows_{int(b)}"] = out, rows[sel]
                    continue
                lat = self._map(lay.latents_path(int(b)))
                for k, j in enumerate(sel):
                    lat[lay.pos[rows[j]]] = out[k]
            ctx, pooled = self.family.encode_text(self.comps, [str(c) for c in batch["caption"]], self.device)
            context = ctx.float().cpu().numpy().astype(np.float16)
            pooled = None if pooled is None else pooled.float().cpu().numpy().astype(np.float16)
        if self.on_store:
            block["context"] = context
            if pooled is not None:
                block["pooled"] = pooled
            buf = io.BytesIO()
            np.savez(buf, **block)
            storage.write_once(storage.join(lay.folder, "blocks", f"{int(batch['block'][0])}.npz"), buf.getvalue())
            return {"block": batch["block"][:1]}
        self._map(os.path.join(lay.folder, "context.npy"))[rows] = context
        if pooled is not None:
            self._map(os.path.join(lay.folder, "pooled.npy"))[rows] = pooled
        for m in self._maps.values():
            m.flush()
        return {"block": batch["block"][:1]}


def fingerprint(index: pa.Table, spec, buckets: list[Bucket]) -> str:
    """What the cache's contents depend on: every sample's bytes and caption, the model, the buckets."""
    return layout.fingerprint({**{c: index.column(c).to_pylist() for c in ("shard", "offset", "size", "caption")},
                               "model": vars(spec.model), "buckets": [(b.width, b.height) for b in buckets],
                               "version": VERSION})


def build_cache(spec, index: pa.Table, buckets: list[Bucket], bucket_of: np.ndarray, actor_pass, gpu: bool,
                log=None) -> str:
    """Fill ``OUTPUT/cache/<fingerprint>`` with one pass of ``EncodeBlock`` actors (skipping finished
    blocks). ``actor_pass(blocks, cls, kwargs, resources)`` runs it (``pipeline.adapter.actor_pass``);
    ``gpu``: the cluster has a GPU for each encoder actor."""
    from tqdm import tqdm

    from pipeline.contract.stage import Resources
    from training import families

    folder = storage.join(TrainRun(storage.absolute(spec.output.path)).cache, fingerprint(index, spec, buckets))
    if storage.exists(storage.join(folder, "done.json")):
        return folder
    on_store = storage.is_url(folder)
    dims = families.get(spec.model.kind).cache_dims(spec.model.pretrained, spec.model.allow_download)
    if on_store:                     # a block's object is its own marker: one listing says which are done
        finished = {storage.name(f) for f in storage.files_in(storage.join(folder, "blocks"), ".npz")}
    else:
        os.makedirs(os.path.join(folder, "blocks"), exist_ok=True)
        Layout(folder, buckets, bucket_of, dims).create()
        finished = set(os.listdir(os.path.join(folder, "blocks")))
    rows = index.select(["shard", "offset", "size", "caption"]).append_column(
        "row", pa.array(np.arange(index.num_rows))
    )
    blocks = []
    for i, start in enumerate(range(0, index.num_rows, BLOCK_ROWS)):
        if f"{i}.npz" not in finished and f"{i}.done" not in finished:
            part = rows.slice(start, BLOCK_ROWS)
            blocks.append(part.append_column("block", pa.array(np.full(part.num_rows, i))))
    if blocks:
        kwargs = {"spec": spec.to_dict(), "folder": folder, "bucket_of": np.asarray(bucket_of),
                  "buckets": [(b.width, b.height) for b in buckets], "dims": dims, "device": "cuda" if gpu else "cpu"}
        res = Resources(num_cpus=1.0, num_gpus=1.0 if gpu else 0.0, concurrency=spec.ray.num_workers if gpu else 1)
        bar = tqdm(total=len(blocks), desc="cache latents", unit="block", file=log, disable=log is None)
        for out in actor_pass(blocks, EncodeBlock, kwargs, res):
            for b in np.unique(out["block"]):
                if not on_store:
                    open(os.path.join(folder, "blocks", f"{int(b)}.done"), "w").close()
                bar.update(1)
        bar.close()
    storage.write_once(storage.join(folder, "done.json"), json.dumps({"samples": index.num_rows, **dims}).encode())
    return folder


class LatentCache:
    """Read side: a sample's (mean, std, context, pooled) from the memory-mapped files."""

    def __init__(self, folder: str, buckets: list[Bucket], bucket_of: np.ndarray):
        dims = json.loads(storage.read_bytes(storage.join(folder, "done.json")))
        self._scratch = None
        if storage.is_url(folder):
            self._scratch = storage.scratch("winnow-cache-")
            folder = _materialise(folder, self._scratch.__enter__(), buckets, bucket_of, dims)
        self.layout = Layout(folder, buckets, bucket_of, dims)
        self.latents = {b: np.load(self.layout.latents_path(b), mmap_mode="r")
                        for b in range(len(buckets)) if self.layout.counts[b]}
        self.context = np.load(os.path.join(folder, "context.npy"), mmap_mode="r")
        pooled = os.path.join(folder, "pooled.npy")
        self.pooled = np.load(pooled, mmap_mode="r") if os.path.exists(pooled) else None
        self.empty = np.load(os.path.join(folder, "empty.npy"))
        ep = os.path.join(folder, "empty_pooled.npy")
        self.empty_pooled = np.load(ep) if os.path.exists(ep) else None

    def close(self) -> None:
        """Drop the maps; a cache copied from a store leaves this node's scratch."""
        self.latents, self.context, self.pooled = {}, None, None
        if self._scratch is not None:
            self._scratch.__exit__(None, None, None)
            self._scratch = None

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        b = int(self.layout.bucket_of[i])
        return (np.asarray(self.latents[b][self.layout.pos[i]]), np.asarray(self.context[i]),
                None if self.pooled is None else np.asarray(self.pooled[i]))

    @staticmethod
    def crop_ids(width: int, height: int, bucket: Bucket) -> tuple[int, int]:
        c = plan_crop(width, height, bucket)
        return c.top, c.left


def _materialise(url: str, local: str, buckets: list[Bucket], bucket_of: np.ndarray, dims: dict) -> str:
    """The memory-mapped files of a cache whose blocks are on a store, filled in ``local`` from them."""
    lay = Layout(local, buckets, bucket_of, dims)
    lay.create()
    for name in ("empty.npy", "empty_pooled.npy"):
        if storage.exists(storage.join(url, name)):
            storage.download(storage.join(url, name), os.path.join(local, name))
    maps = {b: np.load(lay.latents_path(b), mmap_mode="r+") for b in range(len(buckets)) if lay.counts[b]}
    context = np.load(os.path.join(local, "context.npy"), mmap_mode="r+")
    pooled = np.load(os.path.join(local, "pooled.npy"), mmap_mode="r+") if dims["pooled"] else None
    for f in storage.files_in(storage.join(url, "blocks"), ".npz"):
        with np.load(io.BytesIO(storage.read_bytes(f)), allow_pickle=False) as block:
            rows = block["rows"]
            context[rows] = block["context"]
            if pooled is not None:
                pooled[rows] = block["pooled"]
            for key in block.files:
                if key.startswith("latents_"):
                    b = int(key[len("latents_"):])
                    maps[b][lay.pos[block[f"rows_{b}"]]] = block[key]
    for m in (*maps.values(), context, *([] if pooled is None else [pooled])):
        m.flush()
    return local


__all__ = ["LatentCache", "build_cache"]
