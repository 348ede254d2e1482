"""Row fragments and WebDataset shards, each written atomically (temporary name, then rename).

During annotation every batch is written as a parquet *fragment* per partition under
``_work/rows/PPPPP/``; a fragment exists whole or not at all, so the keys present in fragments
are exactly the work that survived a crash. A shard is then assembled from its partition's
fragments: ``PPPPP.tar`` (img2dataset layout), ``PPPPP.parquet`` (every input row of the
partition, kept and rejected) and ``PPPPP_stats.json``, written last as the done marker.
"""
from __future__ import annotations

import io
import json
import math
import os
import tarfile
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.stage import (BULK_COLUMNS, CAPTION, COLUMN_TYPES, DUPLICATE_OF, IMAGE, IMAGE_EXT, KEPT, KEY, PARTITION,
                            REJECT_REASON, REJECTED, STATUS, TIMING_PREFIX, ensure_status)

# plan bookkeeping that says where bytes lived; not part of the annotation contract
PLAN_ONLY = ("ref_path", "ref_offset", "ref_size", "caption_ref", "json_ref", "plan_error")


def atomic_write(path: str, data: bytes) -> None:
    tmp = f"{os.path.dirname(path)}/.{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _to_arrow(values: list) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        # mixed types from free-form metadata: keep them, as text
        return pa.array([None if v is None else str(v) for v in values], pa.string())


def batch_to_table(batch: dict[str, np.ndarray], drop: tuple[str, ...] = ()) -> pa.Table:
    cols = {}
    for name, values in batch.items():
        if name in drop:
            continue
        cols[name] = _to_arrow(values.tolist() if isinstance(values, np.ndarray) else list(values))
    return pa.table(cols)


def conform(table: pa.Table) -> pa.Table:
    """Cast contract columns to their Arrow types (nulls cross Ray as NaN, ints as floats)."""
    for name, typ in COLUMN_TYPES.items():
        if name in table.column_names and table.schema.field(name).type != pa.type_for_alias(typ):
            i = table.column_names.index(name)
            col = table.column(name)
            if pa.types.is_floating(col.type):
                col = pc.if_else(pc.is_nan(col), pa.scalar(None, col.type), col)
            table = table.set_column(i, name, col.cast(pa.type_for_alias(typ)))
    return table


def table_bytes(table: pa.Table, compression: str = "zstd") -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression=compression)
    return sink.getvalue()


class FragmentWriter:
    """Last step of the annotate pass: persist each batch's rows per partition, return a tally."""

    def __init__(self, work_dir: str):
        self.rows_dir = os.path.join(work_dir, "rows")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ensure_status(batch)
        table = conform(batch_to_table(batch, drop=("raw_bytes",)))
        parts = table.column(PARTITION).to_numpy()
        for p in np.unique(parts):
            sub = table.filter(pa.array(parts == p))
            d = os.path.join(self.rows_dir, f"{int(p):05d}")
            os.makedirs(d, exist_ok=True)
            # fragments hold encoded images: compressing them again costs CPU and saves nothing
            atomic_write(os.path.join(d, f"{uuid.uuid4().hex}.parquet"), table_bytes(sub, compression="none"))
        return {KEY: np.asarray(batch[KEY], dtype=object), STATUS: np.asarray(batch[STATUS], dtype=object)}


def fragment_files(work_dir: str, partition: int | None = None) -> list[str]:
    rows = os.path.join(work_dir, "rows")
    if not os.path.isdir(rows):
        return []
    parts = [f"{partition:05d}"] if partition is not None else sorted(os.listdir(rows))
    files = []
    for p in parts:
        d = os.path.join(rows, p)
        if os.path.isdir(d):
            files += [os.path.join(d, f) for f in sorted(os.listdir(d)) if f.endswith(".parquet")]
    return files


def read_fragments(files: list[str], columns: list[str] | None = None) -> pa.Table | None:
    tables = []
    for f in files:
        schema_names = pq.read_schema(f).names
        cols = None if columns is None else [c for c in columns if c in schema_names]
        tables.append(pq.read_table(f, columns=cols))
    if not tables:
        return None
    table = pa.concat_tables(tables, promote_options="permissive")
    # a retried task may have written the same rows twice: keep the first copy of each key
    keys = table.column(KEY).to_pylist()
    seen: set[str] = set()
    first = []
    for i, k in enumerate(keys):
        if k not in seen:
            seen.add(k)
            first.append(i)
    if len(first) != len(keys):
        table = table.take(pa.array(first))
    return table


def done_keys(work_dir: str) -> set[str]:
    table = read_fragments(fragment_files(work_dir), columns=[KEY])
    return set(table.column(KEY).to_pylist()) if table is not None else set()


def shard_name(partition: int) -> str:
    return f"{partition:05d}"


def shard_done(shards_dir: str, partition: int) -> bool:
    return os.path.exists(os.path.join(shards_dir, f"{shard_name(partition)}_stats.json"))


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, (np.generic,)):
        return v.item()
    if isinstance(v, bytes):
        return None
    return v


def reason_category(reason: str | None) -> str:
    return (reason or "").split(":", 1)[0].strip() or "unknown"


def _add_tar_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0          # byte-identical shards across re-runs
    info.mode = 0o644
    tf.addfile(info, io.BytesIO(data))


def write_shard(work_dir: str, shards_dir: str, partition: int, expected: int,
                reductions: dict[str, tuple[str, str | None]]) -> dict:
    """Assemble one shard from its fragments; returns its stats (also written as the done marker)."""
    name = shard_name(partition)
    table = read_fragments(fragment_files(work_dir, partition))
    count = 0 if table is None else table.num_rows
    if count != expected:
        raise RuntimeError(f"partition {name}: {count} annotated rows, expected {expected}; re-run to finish it")
    rows = sorted(table.to_pylist(), key=lambda r: r[KEY])
    timing: dict[str, float] = {}
    for r in rows:
        for c in [c for c in r if c.startswith(TIMING_PREFIX)]:
            timing[c[len(TIMING_PREFIX):]] = timing.get(c[len(TIMING_PREFIX):], 0.0) + float(r.pop(c) or 0.0)
        for c in PLAN_ONLY:
            r.pop(c, None)
        r.setdefault(DUPLICATE_OF, None)
        red = reductions.get(r[KEY])
        if red and r[STATUS] == KEPT:
            r[STATUS], r[REJECT_REASON], r[DUPLICATE_OF] = REJECTED, red[0], red[1]
    buf = io.BytesIO()
    kept = 0
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for r in rows:
            if r[STATUS] != KEPT:
                continue
            kept += 1
            meta = {k: _jsonable(v) for k, v in r.items() if k not in BULK_COLUMNS}
            _add_tar_member(tf, f"{r[KEY]}.{r.get(IMAGE_EXT) or 'jpg'}", r[IMAGE])
            _add_tar_member(tf, f"{r[KEY]}.txt", (r.get(CAPTION) or "").encode("utf-8"))
            _add_tar_member(tf, f"{r[KEY]}.json", json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"))
    os.makedirs(shards_dir, exist_ok=True)
    atomic_write(os.path.join(shards_dir, f"{name}.tar"), buf.getvalue())
    ann = [{k: v for k, v in r.items() if k not in BULK_COLUMNS} for r in rows]
    atomic_write(os.path.join(shards_dir, f"{name}.parquet"), table_bytes(conform(pa.Table.from_pylist(ann))))
    reasons: dict[str, int] = {}
    for r in rows:
        if r[STATUS] != KEPT:
            cat = reason_category(r[REJECT_REASON])
            reasons[cat] = reasons.get(cat, 0) + 1
    stats = {"shard": name, "partition": partition, "count": len(rows), "kept": kept,
             "rejected": len(rows) - kept, "reasons": dict(sorted(reasons.items())),
             "stage_seconds": {k: round(v, 4) for k, v in timing.items()},
             "tar_bytes": buf.tell()}
    atomic_write(os.path.join(shards_dir, f"{name}_stats.json"), json.dumps(stats, indent=2).encode())
    return stats
