"""Row fragments and WebDataset shards, each written atomically (temporary name, then rename).

During annotation every batch is written as a parquet *fragment* per partition under
``_work/rows/PPPPP/``; a fragment exists whole or not at all, so the keys present in fragments
are exactly the work that survived a crash. A shard is then assembled from its partition's
fragments: ``PPPPP.tar`` (img2dataset layout), ``PPPPP.parquet`` (every input row of the
partition, kept and rejected) and ``PPPPP_stats.json``, written last as the done marker.
"""
from __future__ import annotations

import functools
import json
import math
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.contract import layout, storage
from pipeline.contract import tar as tars
from pipeline.contract.layout import VIDEO_ROWS_DIR, atomic_write, table_bytes
from pipeline.contract.schema import (
    BULK_COLUMNS,
    CAPTION,
    COLUMN_TYPES,
    DUPLICATE_OF,
    EMBEDDING_COLUMNS,
    IMAGE,
    IMAGE_EXT,
    JSON_LIST_COLUMNS,
    KEPT,
    KEY,
    PARTITION,
    REJECT_REASON,
    REJECTED,
    RSS_PREFIX,
    STATUS,
    TIMING_PREFIX,
)
from pipeline.contract.stage import ensure_status, reason_counts
from pipeline.contract.storage import join

# plan bookkeeping that says where bytes lived; not part of the annotation contract
PLAN_ONLY = ("ref_path", "ref_offset", "ref_size", "caption_ref", "json_ref", "plan_error")


def _to_arrow(values: list) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        # mixed types from free-form metadata: keep them, as text
        return pa.array([None if v is None else str(v) for v in values], pa.string())


def embedding_array(values: np.ndarray) -> pa.Array:
    """rows x dim floats -> fixed_size_list<halffloat>; rows of NaN (no embedding) become null."""
    values = np.asarray(values, dtype=np.float32)
    missing = np.isnan(values).any(axis=1)
    flat = pa.array(np.nan_to_num(values).astype(np.float16).reshape(-1), pa.float16())
    arr = pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
    if missing.any():
        arr = pc.if_else(pa.array(~missing), arr, pa.scalar(None, arr.type))
    return arr


def batch_to_table(batch: dict[str, np.ndarray], drop: tuple[str, ...] = ()) -> pa.Table:
    cols = {}
    for name, values in batch.items():
        if name in drop:
            continue
        if isinstance(values, np.ndarray) and values.ndim == 2 and values.dtype.kind == "f":
            cols[name] = embedding_array(values)
            continue
        cols[name] = _to_arrow(values.tolist() if isinstance(values, np.ndarray) else list(values))
    return pa.table(cols)


def conform(table: pa.Table) -> pa.Table:
    """Cast contract columns to their Arrow types (nulls cross Ray as NaN, ints as floats)."""
    for name, typ in COLUMN_TYPES.items():
        if name not in table.column_names:
            continue
        i = table.column_names.index(name)
        col = table.column(name)
        if pa.types.is_floating(col.type):   # a missing score is null, never NaN
            col = pc.if_else(pc.is_nan(col), pa.scalar(None, col.type), col)
        if col.type != pa.type_for_alias(typ):
            col = col.cast(pa.type_for_alias(typ))
        table = table.set_column(i, name, col)
    return table


class FragmentWriter:
    """Last step of the annotate pass: persist each batch's rows per partition, return a tally.

    Called with a batch, it writes it at once. ``add`` and ``flush`` let a task gather the batches
    of a whole block first (``adapter.TimedChain``): one fragment per block and partition, not
    one per stage batch, so a run of 10^6 rows fsyncs ~4,000 files, not ~60,000 (bench/scale.py)."""

    FLUSH_BYTES = 64 * 2 ** 20    # gathered rows past this are written without waiting for the block's end

    def __init__(self, work_dir: str, skip_keys: frozenset = frozenset()):
        self.rows_dir = join(work_dir, "rows")
        self.skip_keys = skip_keys      # rows an earlier run already wrote (a video redone after a kill)
        self._held: list[pa.Table] = []
        self._tally: list[pa.Table] = []
        self._bytes = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.add(batch)
        return self.flush()

    def add(self, batch: dict[str, np.ndarray]) -> None:
        ensure_status(batch)
        table = batch_to_table(batch, drop=("raw_bytes",))
        self._tally.append(table.select([KEY, STATUS]))
        self._held.append(table)
        self._bytes += table.nbytes
        if self._bytes > self.FLUSH_BYTES:
            self._write()

    def _prepare(self, table: pa.Table) -> pa.Table:
        table = conform(table)
        for name in JSON_LIST_COLUMNS:
            if name in table.column_names and pa.types.is_string(table.column(name).type):
                values = [None if v is None else json.loads(v) for v in table.column(name).to_pylist()]
                table = table.set_column(table.column_names.index(name), name, pa.array(values, pa.list_(pa.float64())))
        if self.skip_keys:
            table = table.filter(pa.array([k not in self.skip_keys for k in table.column(KEY).to_pylist()]))
        return table

    def _write(self) -> None:
        if not self._held:
            return
        held, self._held, self._bytes = self._held, [], 0
        try:        # the block's batches as one table, its columns cast once (``conform``)
            tables = [self._prepare(pa.concat_tables(held, promote_options="permissive"))]
        except (pa.ArrowInvalid, pa.ArrowTypeError):    # free-form metadata typed apart: a fragment per batch
            tables = [self._prepare(t) for t in held]
        for table in tables:
            parts = table.column(PARTITION).to_numpy()
            for p in np.unique(parts):
                sub = table.filter(pa.array(parts == p))
                d = join(self.rows_dir, f"{int(p):05d}")
                storage.makedirs(d)
                # fragments hold encoded images: compressing them again costs CPU and saves nothing
                atomic_write(join(d, f"{uuid.uuid4().hex}.parquet"), table_bytes(sub, compression="none"))

    def flush(self) -> dict[str, np.ndarray]:
        """Write what is gathered; the keys and statuses of every row added since the last flush."""
        self._write()
        tally = pa.concat_tables(self._tally, promote_options="permissive")
        self._tally = []
        return {KEY: np.asarray(tally.column(KEY).to_pylist(), dtype=object),
                STATUS: np.asarray(tally.column(STATUS).to_pylist(), dtype=object)}


def fragment_files(work_dir: str, partition: int | None = None) -> list[str]:
    """The fragments of one partition, or of all (one recursive listing: on a store, one LIST per
    thousand keys, not one per partition). A fragment is a whole object, so whatever is listed is complete."""
    rows = join(work_dir, "rows")
    if partition is not None:
        return storage.files_in(join(rows, f"{partition:05d}"), ".parquet")
    return [f for f in storage.find(rows, ".parquet") if not storage.name(f).startswith(".")]


def read_fragments(files: list[str], columns: list[str] | None = None) -> pa.Table | None:
    tables = []
    for f in files:
        tables.append(layout.read_table(f, columns=columns, present=True))
    if not tables:
        return None
    table = pa.concat_tables(tables, promote_options="permissive")
    return first_copies(table)


def first_copies(table: pa.Table) -> pa.Table:
    """A retried task may have written the same rows twice: the first copy of each key, in order
    (in Arrow: no Python object per row)."""
    n = table.num_rows
    if pc.count_distinct(table.column(KEY)).as_py() == n:
        return table
    rows = pa.table({KEY: table.column(KEY), "row": pa.array(np.arange(n, dtype=np.int64))})
    first = rows.group_by(KEY, use_threads=False).aggregate([("row", "min")]).column("row_min")
    return table.take(pa.array(np.sort(first.to_numpy())))


class FragmentRows:
    """What a run-level reduction reads: the annotated rows, all at once or streamed.

    ``exclude`` holds keys an earlier reduction already rejected; ``scratch`` is a folder under
    ``_work`` the reduction may fill (it is deleted with ``_work``).
    """

    def __init__(self, work_dir: str, exclude: set[str] | frozenset = frozenset(), scratch: str = ""):
        self.files = fragment_files(work_dir)
        self.exclude = exclude
        self.scratch = scratch

    def table(self, columns: list[str], where=None) -> pa.Table | None:
        """The rows' ``columns`` (and key). ``where(table) -> mask`` keeps, fragment by fragment as
        they are read, only the rows a reduction can use (pHash: kept rows with a hash), so the
        driver never holds the run's every row; a key written twice (a retried task) then counts
        by its first copy that passes."""
        cols = list(dict.fromkeys([KEY, *columns]))
        if where is None:
            table = read_fragments(self.files, columns=cols)
        else:
            parts = [t.filter(where(t)) for t in (layout.read_table(f, columns=cols, present=True) for f in self.files)]
            table = first_copies(pa.concat_tables(parts, promote_options="permissive")) if parts else None
        if table is not None and self.exclude:
            gone = pc.is_in(table.column(KEY), value_set=pa.array(sorted(self.exclude), table.schema.field(KEY).type))
            table = table.filter(pc.invert(gone))
        return table

    def batches(self, columns: list[str]):
        """One table per fragment file, each key once over the whole stream, bounded memory."""
        seen: set[str] = set()
        for f in self.files:
            table = layout.read_table(f, columns=list(dict.fromkeys([KEY, *columns])), present=True)
            keys = table.column(KEY).to_pylist()
            mask = [k not in seen and k not in self.exclude for k in keys]
            seen.update(keys)
            if any(mask):
                yield table.filter(pa.array(mask))


class TableRows:
    """The same interface over an in-memory table (tests, notebooks, re-running a reduction)."""

    def __init__(self, table: pa.Table, scratch: str = "", batch_rows: int = 65536):
        self._table, self.scratch, self.batch_rows = table, scratch, batch_rows

    def table(self, columns: list[str], where=None) -> pa.Table:
        table = self._table.select([c for c in dict.fromkeys([KEY, *columns]) if c in self._table.column_names])
        return table if where is None else table.filter(where(table))

    def batches(self, columns: list[str]):
        table = self.table(columns)
        for i in range(0, table.num_rows, self.batch_rows):
            yield table.slice(i, self.batch_rows)


def done_keys(work_dir: str) -> set[str]:
    table = read_fragments(fragment_files(work_dir), columns=[KEY])
    return set(table.column(KEY).to_pylist()) if table is not None else set()


def shard_name(partition: int) -> str:
    return f"{partition:05d}"


def done_partitions(shards_dir: str) -> set[int]:
    """The partitions whose shard is complete (its ``NNNNN_stats.json`` marker is there): one listing
    of the folder (on a store one LIST per thousand keys), not a request per partition."""
    names = (storage.name(f) for f in storage.files_in(shards_dir, "_stats.json"))
    return {int(n[:-len("_stats.json")]) for n in names if n[:-len("_stats.json")].isdigit()}


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, (np.generic,)):
        return v.item()
    if isinstance(v, bytes):
        return None
    return v


def write_embeddings(path: str, table: pa.Table) -> None:
    """Keyed embeddings of one shard (every row that has one, kept or rejected)."""
    has_any = functools.reduce(pc.or_, [pc.is_valid(table.column(c)) for c in table.column_names if c != KEY])
    storage.makedirs(storage.parent(path))
    atomic_write(path, table_bytes(table.filter(has_any)))


def write_shard(work_dir: str, shards_dir: str, partition: int, expected: int,
                reductions: dict[str, tuple[str, str | None]], split_rows=None, text: str = CAPTION) -> dict:
    """Assemble one shard from its fragments; returns its stats (also written as the done marker).
    ``split_rows``: a fan-out stage's ``FanOut.split_rows`` (rows -> output rows, one row per input).
    ``text``: the column each ``KEY.txt`` holds (``output.caption``); where that is empty, the source
    caption. The ``.json`` carries every caption column either way."""
    name = shard_name(partition)
    table = read_fragments(fragment_files(work_dir, partition))
    count = 0 if table is None else table.num_rows
    if count != expected:
        raise RuntimeError(f"partition {name}: {count} annotated rows, expected {expected}; re-run to finish it")
    table = table.sort_by(KEY)
    emb_cols = [c for c in EMBEDDING_COLUMNS if c in table.column_names]
    embeddings = table.select([KEY, *emb_cols]) if emb_cols else None
    table = table.drop_columns(emb_cols)
    rows = table.to_pylist()
    timing: dict[str, float] = {}
    rss: dict[str, float] = {}
    for r in rows:
        for c in [c for c in r if c.startswith(TIMING_PREFIX)]:
            timing[c[len(TIMING_PREFIX):]] = timing.get(c[len(TIMING_PREFIX):], 0.0) + float(r.pop(c) or 0.0)
        for c in [c for c in r if c.startswith(RSS_PREFIX)]:
            rss[c[len(RSS_PREFIX):]] = max(rss.get(c[len(RSS_PREFIX):], 0.0), float(r.pop(c) or 0.0))
        for c in PLAN_ONLY:
            r.pop(c, None)
        r.setdefault(DUPLICATE_OF, None)
        red = reductions.get(r[KEY])
        if red and r[STATUS] == KEPT:
            r[STATUS], r[REJECT_REASON], r[DUPLICATE_OF] = REJECTED, red[0], red[1]
    videos = None
    if split_rows is not None:   # clips: number them, and gather one row per video
        rows, videos = split_rows(rows)
    blocks: list[bytes] = []
    kept = 0
    for r in rows:
        if r[STATUS] != KEPT:
            continue
        kept += 1
        meta = {k: _jsonable(v) for k, v in r.items() if k not in BULK_COLUMNS}
        blocks.append(tars.block(f"{r[KEY]}.{r.get(IMAGE_EXT) or 'jpg'}", r[IMAGE]))
        blocks.append(tars.block(f"{r[KEY]}.txt", (r.get(text) or r.get(CAPTION) or "").encode("utf-8")))
        blocks.append(
            tars.block(f"{r[KEY]}.json", json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"))
        )
    blocks.append(tars.end(sum(len(b) for b in blocks)))
    ann = [{k: v for k, v in r.items() if k not in BULK_COLUMNS} for r in rows]
    reasons = reason_counts(r[REJECT_REASON] for r in rows if r[STATUS] != KEPT)
    stats = {"shard": name, "partition": partition, "count": len(rows), "kept": kept,
             "rejected": len(rows) - kept, "reasons": dict(sorted(reasons.items())),
             "stage_seconds": {k: round(v, 4) for k, v in timing.items()},
             "stage_rss_mb": {k: round(v, 1) for k, v in rss.items()}}
    return commit_shard(shards_dir, partition, blocks, conform(pa.Table.from_pylist(ann)), stats, embeddings,
                        None if videos is None else pa.Table.from_pylist(videos))


def commit_shard(shards_dir: str, partition: int, tar_chunks, table: pa.Table, stats: dict,
                 embeddings: pa.Table | None = None, per_input: pa.Table | None = None) -> dict:
    """Write one shard, the one way curate and select both do: its embeddings and per-input rows
    beside ``shards/``, ``NNNNN.tar`` (from ``tar_chunks``, bytes or an iterator of them),
    ``NNNNN.parquet``, then ``NNNNN_stats.json`` (``stats`` + ``tar_bytes``) last, as the done marker.
    Every file is written atomically, so a killed writer leaves a shard that is whole or not done."""
    name = shard_name(partition)
    root = storage.parent(shards_dir)
    if embeddings is not None:
        write_embeddings(join(root, layout.EMBEDDINGS_DIR, f"{name}.parquet"), embeddings)
    storage.makedirs(shards_dir)
    tar_bytes = atomic_write(join(shards_dir, f"{name}.tar"), tar_chunks)
    atomic_write(join(shards_dir, f"{name}.parquet"), table_bytes(table))
    if per_input is not None:
        # beside shards/, not in it: one parquet schema per glob there (shards/*.parquet reads as one table)
        storage.makedirs(join(root, VIDEO_ROWS_DIR))
        atomic_write(join(root, VIDEO_ROWS_DIR, f"{name}.parquet"), table_bytes(per_input))
    stats = {**stats, "tar_bytes": tar_bytes}
    atomic_write(join(shards_dir, f"{name}_stats.json"), json.dumps(stats, indent=2).encode())
    return stats
