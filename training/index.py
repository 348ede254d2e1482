"""The training index: one row per kept sample of a curated shard set, with what the loader needs
to fetch it by one ranged read (shard, byte offset and size of the image inside the tar) plus its
caption and sizes. Buckets are assigned from the stored sizes for each stage's resolution, so one
index serves every stage.

One pass (a Ray task per shard, through ``pipeline.adapter``) reads only tar headers and the shard's annotation parquet.
The result is cached as ``.winnow/train_index.parquet`` beside ``shards/`` (or in the training output
when the shard set is read-only) and rebuilt when the shard files change.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa

from pipeline.contract import layout, storage
from pipeline.contract import tar as tars
from pipeline.contract.config import ConfigError
from pipeline.contract.layout import fingerprint, manifest_runs
from pipeline.contract.media import open_image
from pipeline.contract.schema import (
    CAPTION,
    CAPTION_COLUMNS,
    HEIGHT,
    KEPT,
    KEY,
    STATUS,
    STORED_HEIGHT,
    STORED_WIDTH,
    WIDTH,
)
from training.buckets import Bucket, assign, bucket_table

INDEX_FILE = ".winnow/train_index.parquet"   # hidden: not a "train" split to HF datasets
CLIP_INDEX_FILE = ".winnow/train_clip_index.parquet"
IMAGE_EXTS = {"jpg", "jpeg", "png", "webp"}
CLIP_EXTS = ("mp4",)
INDEX_VERSION = 2          # 2: the synthetic caption columns; a cached index of another version is rebuilt
SYNTHETIC = [(c, pa.string()) for c in CAPTION_COLUMNS]      # null where the run did not make them
# a clip's row: where its MP4 is, and what sampling and conditioning need (fps, frames, motion)
CLIP_SCHEMA = pa.schema([("shard", pa.string()), ("key", pa.string()), ("offset", pa.int64()), ("size", pa.int64()),
                         ("caption", pa.string()), ("width", pa.int64()), ("height", pa.int64()),
                         ("fps", pa.float64()), ("num_frames", pa.int64()), ("duration_s", pa.float64()),
                         ("motion_score", pa.float64()), *SYNTHETIC])
SCHEMA = pa.schema([("shard", pa.string()), ("key", pa.string()), ("offset", pa.int64()), ("size", pa.int64()),
                    ("ext", pa.string()), ("caption", pa.string()), ("width", pa.int64()), ("height", pa.int64()),
                    ("original_width", pa.int64()), ("original_height", pa.int64()), *SYNTHETIC])


class Strings:
    """A string column of the training index read by row number without a Python object per row:
    a column of few distinct values (the shard paths) as int32 codes into its distinct values,
    any other (captions, keys) as its Arrow array, one ``as_py`` per read. At 10^7 rows a list
    would hold ~10^7 str objects (~60-100 bytes each) in every training worker (bench/scale.py)."""

    def __init__(self, column, dictionary: bool = False):
        import pyarrow.compute as pc

        array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        self.values: list | None = None
        if dictionary:
            encoded = pc.dictionary_encode(array)
            self.values = encoded.dictionary.to_pylist()
            self.codes = encoded.indices.to_numpy(zero_copy_only=False)
        else:
            self.array = array

    def __len__(self) -> int:
        return len(self.codes) if self.values is not None else len(self.array)

    def __getitem__(self, i: int):
        if self.values is not None:
            return self.values[self.codes[i]]
        return self.array[int(i)].as_py()

    def distinct(self) -> list:
        """The distinct values, in order of first appearance (dictionary columns only)."""
        return list(self.values)



def shard_dir(path: str) -> str:
    """A run folder (with ``shards/``) or a shards folder itself."""
    sub = storage.join(path, layout.SHARDS_DIR)
    return sub if storage.isdir(sub) else path


def list_shards(path: str) -> list[dict]:
    """The shard tars of a shard set with their size and modification time (the cache key)."""
    d = storage.absolute(shard_dir(path))
    if not storage.isdir(d):
        raise ConfigError(f"data.shards: {path!r} is not a folder; give a curate output folder or its shards/")
    out = [{"shard": e["path"], "bytes": e["bytes"], "mtime": e["stamp"]} for e in storage.listing(d, ".tar")]
    if not out:
        raise ConfigError(f"data.shards: no .tar shards in {d!r}; run `winnow curate` first")
    return out


def index_shard(shard: str) -> pa.Table:
    """Index rows of one shard: the kept samples that have an image member."""
    members: dict[str, tuple[int, int, str]] = {}
    with storage.open_read(shard) as fh:
        for item in tars.group(list(tars.scan(fh)), tuple(sorted(IMAGE_EXTS))):
            if isinstance(item, tars.Sample) and item.media is not None:
                members[item.key] = (item.media.data, item.media.size, item.media_ext)
    meta_path = shard[:-len(".tar")] + ".parquet"
    meta: dict[str, dict] = {}
    try:
        table = layout.read_table(meta_path)
        cols = [c for c in (KEY, STATUS, CAPTION, WIDTH, HEIGHT, STORED_WIDTH, STORED_HEIGHT, *CAPTION_COLUMNS)
                if c in table.column_names]
        meta = {r[KEY]: r for r in table.select(cols).to_pylist() if r.get(STATUS, KEPT) == KEPT}
    except FileNotFoundError:
        pass
    rows = []
    for key, (offset, size, ext) in members.items():
        r = meta.get(key)
        if r is None or not r.get(STORED_WIDTH):
            r = _sizes_from_json(shard, key, r)
        rows.append({"shard": shard, "key": key, "offset": offset, "size": size, "ext": ext,
                     "caption": r.get(CAPTION) or "", "width": int(r[STORED_WIDTH]), "height": int(r[STORED_HEIGHT]),
                     "original_width": int(r.get(WIDTH) or r[STORED_WIDTH]),
                     "original_height": int(r.get(HEIGHT) or r[STORED_HEIGHT]),
                     **{c: r.get(c) for c in CAPTION_COLUMNS}})
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def index_clip_shard(shard: str) -> pa.Table:
    """Clip-index rows of one shard of a video run: the kept clips, with their annotation row's
    size, fps, frame count and motion score (a clip without them is left out: it cannot be sampled)."""
    members: dict[str, tuple[int, int]] = {}
    with storage.open_read(shard) as fh:
        for item in tars.group(list(tars.scan(fh)), CLIP_EXTS):
            if isinstance(item, tars.Sample) and item.media is not None:
                members[item.key] = (item.media.data, item.media.size)
    try:
        table = layout.read_table(shard[:-len(".tar")] + ".parquet")
    except FileNotFoundError:
        raise ConfigError(f"data.shards: {shard} has no annotation parquet beside it; clips need their fps and "
                          f"frame counts (curate the videos with winnow)") from None
    rows = []
    for r in table.to_pylist():
        if r.get(STATUS, KEPT) != KEPT or r[KEY] not in members or not r.get("fps") or not r.get("num_frames"):
            continue
        offset, size = members[r[KEY]]
        rows.append({"shard": shard, "key": r[KEY], "offset": offset, "size": size, "caption": r.get(CAPTION) or "",
                     "width": int(r[WIDTH]), "height": int(r[HEIGHT]), "fps": float(r["fps"]),
                     "num_frames": int(r["num_frames"]), "duration_s": float(r["num_frames"]) / float(r["fps"]),
                     "motion_score": r.get("motion_score"), **{c: r.get(c) for c in CAPTION_COLUMNS}})
    return pa.Table.from_pylist(rows, schema=CLIP_SCHEMA)


def _sizes_from_json(shard: str, key: str, row: dict | None) -> dict:
    """Shards without an annotation parquet (or older ones): read the sample's JSON, else the image header."""

    with storage.open_read(shard) as fh:
        found = {m.name: m for m in tars.scan(fh)}

        def read(name: str) -> bytes:
            fh.seek(found[name].data)
            return fh.read(found[name].size)

        meta = dict(row or {})
        if f"{key}.json" in found:
            meta.update(json.loads(read(f"{key}.json")))
        if f"{key}.txt" in found and not meta.get(CAPTION):
            meta[CAPTION] = read(f"{key}.txt").decode("utf-8", "replace")
        if not meta.get(STORED_WIDTH):
            img_name = next(n for n, m in found.items()
                            if m.key == key and m.ext.rsplit(".", 1)[-1].lower() in IMAGE_EXTS)
            with open_image(read(img_name)) as im:
                meta[STORED_WIDTH], meta[STORED_HEIGHT] = im.size
    return meta


def _cache_paths(path: str, fallback_dir: str, clips: bool = False) -> list[str]:
    beside = storage.join(storage.parent(shard_dir(path).rstrip("/")), CLIP_INDEX_FILE if clips else INDEX_FILE)
    name = f"{'clip_' if clips else ''}index_{hashlib.sha256(path.encode()).hexdigest()[:8]}.parquet"
    return [beside, storage.join(fallback_dir, name)]


def _read_cached(paths: list[str], fp: str) -> tuple[pa.Table | None, str]:
    for p in paths:
        try:
            t = layout.read_table(p)
        except (FileNotFoundError, OSError, pa.ArrowInvalid):
            continue
        if (t.schema.metadata or {}).get(b"winnow_fingerprint", b"").decode() == fp:
            return t, p
    return None, ""


def index_item(item: dict) -> pa.Table:
    return index_shard(str(item["shard"]))


def clip_index_item(item: dict) -> pa.Table:
    return index_clip_shard(str(item["shard"]))


def build_index(path: str, fallback_dir: str, log=None, map_tables=None, clips: bool = False) -> tuple[pa.Table, str]:
    """The index of shard set ``path`` (cached); returns (table, where it is cached). ``clips``: the
    clip index of a video run (``CLIP_SCHEMA``) instead of the image index.

    ``map_tables(fn, items)`` runs ``fn`` over the shards (``pipeline.adapter.map_tables``: one Ray
    task per shard); without it the shards are read here, one after another."""
    shards = list_shards(path)
    fp = fingerprint({"version": INDEX_VERSION, "clips": clips, "shards": shards})
    paths = _cache_paths(path, fallback_dir, clips)
    cached, where = _read_cached(paths, fp)
    if cached is not None:
        return cached, where
    items = [{"shard": s["shard"]} for s in shards]
    fn, schema = (clip_index_item, CLIP_SCHEMA) if clips else (index_item, SCHEMA)
    parts = list(map_tables(fn, items) if map_tables else map(fn, items))
    table = pa.concat_tables([p.cast(schema) for p in parts]) if parts else schema.empty_table()
    table = table.sort_by([("shard", "ascending"), ("offset", "ascending")])
    table = table.replace_schema_metadata({"winnow_fingerprint": fp})
    for p in paths:
        try:
            storage.makedirs(storage.parent(p))
            storage.write_once(p, layout.table_bytes(table))
            if log:
                print(f"train index: {table.num_rows} samples in {len(shards)} shards -> {p}", file=log)
            return table, p
        except OSError:
            continue
    return table, ""


def load_index(paths: list[str], fallback_dir: str, log=None, selection: str | None = None,
               map_tables=None, clips: bool = False) -> pa.Table:
    """The concatenated index of several shard sets, restricted to a selection manifest if given."""
    tables = [build_index(p, fallback_dir, log, map_tables, clips)[0].replace_schema_metadata(None) for p in paths]
    if selection:
        tables = select(tables, paths, selection)
    table = pa.concat_tables(tables)
    if table.num_rows == 0:
        raise ConfigError(f"data.shards: no kept {'clips' if clips else 'images'} in {paths}; nothing to train on")
    return table


def run_folder(path: str) -> str:
    return storage.absolute(storage.parent(shard_dir(path).rstrip("/")))


def select(tables: list[pa.Table], paths: list[str], selection: str) -> list[pa.Table]:
    """Keep the index rows a ``winnow sweep`` manifest selects. Its ``run`` column indexes the runs
    recorded in its metadata; each shard set is matched to one of them by folder (a manifest without
    that record selects by key alone)."""
    import pyarrow.compute as pc

    man = layout.read_table(selection, columns=["run", KEY])
    runs = manifest_runs(selection)
    out, wanted = [], 0
    for p, t in zip(paths, tables, strict=True):
        if runs:
            folder = run_folder(p)
            if folder not in runs:
                raise ConfigError(f"data.selection: the manifest selects from {runs}; data.shards entry {p!r} is "
                                  f"none of them")
            keys = man.filter(pc.equal(man.column("run"), runs.index(folder))).column(KEY)
        else:
            keys = man.column(KEY)
        wanted += len(keys)
        out.append(t.filter(pc.is_in(t.column("key"), value_set=keys)))
    found = sum(t.num_rows for t in out)
    if runs and found != wanted:
        raise ConfigError(f"data.selection: {wanted - found} of the {wanted} selected samples are not in the shard "
                          f"sets (re-curated since the sweep?); sweep the current annotations again")
    return out


def clip_bucket_ids(index: pa.Table, video) -> tuple[list, np.ndarray]:
    """(the video buckets of ``video`` (a train spec's video section), every clip's bucket or -1)."""
    from training.buckets import assign_clips, video_bucket_table

    table = video_bucket_table(video.buckets)
    return table, assign_clips(index.column("width").to_numpy(), index.column("height").to_numpy(),
                               index.column("duration_s").to_numpy(), index.column("fps").to_numpy(), table,
                               video.fps, video.max_fps, video.min_fps)


def bucket_ids(index: pa.Table, base: int, step: int = 64, max_aspect: float = 4.0) -> tuple[list[Bucket], np.ndarray]:
    """(the buckets for base resolution ``base``, every index row's bucket number)."""
    buckets = bucket_table(base, step, max_aspect)
    return buckets, assign(index.column("width").to_numpy(), index.column("height").to_numpy(), buckets)


__all__ = [
    "CLIP_INDEX_FILE",
    "CLIP_SCHEMA",
    "INDEX_FILE",
    "SCHEMA",
    "index_clip_shard",
    "bucket_ids",
    "build_index",
    "index_shard",
    "list_shards",
    "load_index",
    "select",
    "shard_dir",
]
