"""Readers: turn an input (folder of images, LAION-style parquet, img2dataset shards) into a plan.

A plan is a table with one row per input sample: its stable ``key``, its ``partition`` (the
output shard it lands in), where to fetch its bytes, and the metadata columns that came with
it. Planning only lists; the bytes are fetched by ``LoadSource``, the first stage of every run.
Keys are img2dataset's: zero-padded partition id followed by the index inside the partition,
so they are stable across re-runs of the same input.
"""
from __future__ import annotations

import glob as globlib
import json
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import ConfigError, option
from pipeline.stage import (
    CAPTION,
    KEY,
    LAION_COLUMNS,
    PARTITION,
    RAW,
    SOURCE,
    Stage,
    active,
    column,
    reject,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".3gp")
PATH_COLUMN_CANDIDATES = ("path", "filepath", "file_path", "image_path", "file_name", "filename", "URL", "url")
CAPTION_COLUMN_CANDIDATES = ("caption", "TEXT", "text", "prompt", "alt")

# plan columns describing where bytes live
REF_PATH = "ref_path"            # file to read (image file, or tar holding the sample)
REF_OFFSET = "ref_offset"        # byte offset inside the tar (-1: whole file)
REF_SIZE = "ref_size"
CAPTION_REF = "caption_ref"      # sidecar .txt file path, or "tar:offset:size"
JSON_REF = "json_ref"            # "tar:offset:size" of an img2dataset KEY.json
PLAN_ERROR = "plan_error"        # reason a row is rejected before any bytes are read


@dataclass
class InputSpec:
    path: str = option(help="folder of images or videos, a .parquet file or folder of them, or img2dataset .tar shards (folder, file, glob or {00000..00009} pattern; any fsspec URL)")
    format: Literal["auto", "images", "laion_parquet", "webdataset", "videos"] = option("auto", "input kind; auto detects from the path (videos: a folder of video files, or a parquet whose path column names videos)")
    path_column: str = option("auto", f"parquet column with the image path (auto tries {', '.join(PATH_COLUMN_CANDIDATES)})")
    caption_column: str = option("auto", f"parquet column with the caption (auto tries {', '.join(CAPTION_COLUMN_CANDIDATES)})")
    rename_columns: dict[str, str] = option(help="parquet columns to rename on read, e.g. {aesthetic: AESTHETIC_SCORE}", factory=dict)
    keep_columns: list[str] = option(help="extra parquet/json columns to carry into the annotations (LAION's score columns are always carried)", factory=list)
    base_dir: str | None = option(None, "where relative parquet paths are resolved (default: the parquet's folder)")
    recursive: bool = option(True, "walk sub-folders of an image folder")
    storage_options: dict[str, Any] = option(help="fsspec options for remote paths (e.g. anon: true for public S3)", factory=dict)


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def detect_format(spec: InputSpec) -> str:
    if spec.format != "auto":
        return spec.format
    path = spec.path
    low = path.lower()
    if low.endswith(".parquet"):
        return "videos" if _parquet_names_videos(spec, [path]) else "laion_parquet"
    if low.endswith(".tar") or "{" in path or "*" in path:
        return "webdataset"
    if is_remote(path):
        fs, root = fsspec.core.url_to_fs(path, **spec.storage_options)
        names = [n for n in fs.ls(root, detail=False)]
    else:
        if not os.path.exists(path):
            raise ConfigError(f"input.path {path!r} does not exist; point it at a folder of images, a parquet file or img2dataset shards")
        if os.path.isfile(path):
            raise ConfigError(f"input.path {path!r} is a file of an unknown kind; set input.format to one of images, laion_parquet, webdataset")
        names = [os.path.join(d, f) for d, _, fs_ in os.walk(path) for f in fs_]
    if any(n.endswith(".tar") for n in names):
        return "webdataset"
    images = any(n.lower().endswith(IMAGE_EXTENSIONS) for n in names)
    videos = any(n.lower().endswith(VIDEO_EXTENSIONS) for n in names)
    if images and videos:
        raise ConfigError(f"input.path {path!r} holds both images and videos; set input.format to images or videos "
                          f"(the other kind is ignored), or split the folder")
    if images:
        return "images"
    if videos:
        return "videos"
    parquets = sorted(n for n in names if n.endswith(".parquet"))
    if parquets:
        return "videos" if not is_remote(path) and _parquet_names_videos(spec, parquets[:1]) else "laion_parquet"
    raise ConfigError(f"input.path {path!r} holds no images, videos, parquet or .tar files; set input.format or check the path")


def _parquet_names_videos(spec: InputSpec, files: list[str]) -> bool:
    """Whether a parquet's path column points at video files (its first 100 rows)."""
    try:
        pf = pq.ParquetFile(files[0])
        table = pf.read_row_group(0) if pf.num_row_groups else None
    except Exception:  # noqa: BLE001 - unreadable here: planning reports it properly
        return False
    if table is None:
        return False
    cols = [spec.rename_columns.get(c, c) for c in table.column_names]
    table = table.rename_columns(cols)
    col = spec.path_column if spec.path_column != "auto" else next((c for c in PATH_COLUMN_CANDIDATES if c in cols), None)
    if col not in cols:
        return False
    values = [v for v in table.column(col).slice(0, 100).to_pylist() if isinstance(v, str)]
    return bool(values) and sum(v.lower().endswith(VIDEO_EXTENSIONS) for v in values) > len(values) / 2


@dataclass
class Plan:
    table: pa.Table              # one row per input sample
    format: str
    counts: dict[int, int]       # partition -> number of inputs

    @property
    def num_inputs(self) -> int:
        return self.table.num_rows


def _key_width(counts: list[int], samples_per_shard: int) -> int:
    biggest = max([samples_per_shard] + counts) if counts else samples_per_shard
    return max(4, len(str(biggest - 1)))


def _assign(rows: list[dict], samples_per_shard: int) -> list[dict]:
    width = _key_width([], samples_per_shard)
    for i, row in enumerate(rows):
        p, j = divmod(i, samples_per_shard)
        row[PARTITION] = p
        row[KEY] = f"{p:05d}{j:0{width}d}"
    return rows


def _list_folder(spec: InputSpec, extensions: tuple[str, ...]) -> tuple[list[str], set[str]]:
    root = spec.path
    files = []
    if spec.recursive:
        for d, dirs, names in os.walk(root):
            dirs.sort()
            files += [os.path.join(d, n) for n in names]
    else:
        files = [os.path.join(root, n) for n in os.listdir(root)]
    return sorted(f for f in files if f.lower().endswith(extensions)), set(files)


def plan_images(spec: InputSpec, samples_per_shard: int, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> list[dict]:
    root = spec.path
    images, names = _list_folder(spec, extensions)
    rows = []
    for f in images:
        sidecar = os.path.splitext(f)[0] + ".txt"
        rows.append({SOURCE: os.path.relpath(f, root), REF_PATH: f, REF_OFFSET: -1, REF_SIZE: -1,
                     CAPTION_REF: sidecar if sidecar in names else None})
    return _assign(rows, samples_per_shard)


def _pick(columns: list[str], wanted: str, candidates: tuple[str, ...], what: str, path: str) -> str | None:
    if wanted != "auto":
        if wanted not in columns:
            raise ConfigError(f"input.{what}: column {wanted!r} is not in {path} (columns: {', '.join(columns)})")
        return wanted
    for c in candidates:
        if c in columns:
            return c
    return None


def plan_parquet(spec: InputSpec, samples_per_shard: int) -> list[dict]:
    path = spec.path
    if os.path.isdir(path):
        files = sorted(globlib.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
    else:
        files = [path]
    if not files:
        raise ConfigError(f"input.path {path!r}: no .parquet files found")
    rows: list[dict] = []
    for f in files:
        try:
            table = pq.read_table(f)
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(f"input.path: cannot read parquet {f!r}: {exc}") from None
        if spec.rename_columns:
            table = table.rename_columns([spec.rename_columns.get(c, c) for c in table.column_names])
        cols = table.column_names
        path_col = _pick(cols, spec.path_column, PATH_COLUMN_CANDIDATES, "path_column", f)
        if path_col is None:
            raise ConfigError(f"input.path_column: none of {PATH_COLUMN_CANDIDATES} is in {f}; set input.path_column to the column holding image paths (columns: {', '.join(cols)})")
        cap_col = _pick(cols, spec.caption_column, CAPTION_COLUMN_CANDIDATES, "caption_column", f)
        carry = [c for c in dict.fromkeys(list(LAION_COLUMNS) + list(spec.keep_columns)) if c in cols]
        missing = [c for c in spec.keep_columns if c not in cols]
        if missing:
            raise ConfigError(f"input.keep_columns: {missing} not in {f} (columns: {', '.join(cols)})")
        base = spec.base_dir or os.path.dirname(os.path.abspath(f))
        data = table.select(list(dict.fromkeys([path_col] + ([cap_col] if cap_col else []) + carry))).to_pylist()
        for rec in data:
            ref = rec.get(path_col)
            row = {SOURCE: os.path.basename(f), REF_OFFSET: -1, REF_SIZE: -1, CAPTION_REF: None,
                   CAPTION: rec.get(cap_col) if cap_col else None}
            for c in carry:
                row[c] = rec.get(c)
            if path_col.lower() == "url":
                row["url"] = ref
            if not ref or not isinstance(ref, str):
                row[REF_PATH], row[PLAN_ERROR] = None, "missing_file: empty path"
            elif ref.startswith(("http://", "https://")):
                row[REF_PATH] = ref
                row[PLAN_ERROR] = "not_downloaded: URL inputs are fetched by img2dataset; run it and read its shards"
            else:
                row[REF_PATH] = ref if (is_remote(ref) or os.path.isabs(ref)) else os.path.join(base, ref)
            rows.append(row)
    return _assign(rows, samples_per_shard)


def list_tars(spec: InputSpec) -> list[str]:
    path = spec.path
    opts = spec.storage_options
    if "{" in path:
        import braceexpand
        return list(braceexpand.braceexpand(path))
    fs, root = fsspec.core.url_to_fs(path, **opts)
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    prefix = "" if protocol in ("file", "local") else f"{protocol}://"
    if "*" in root:
        found = fs.glob(root)
    elif fs.isdir(root):
        found = fs.find(root)
    else:
        found = [root]
    tars = sorted(f for f in found if f.endswith(".tar"))
    if not tars:
        raise ConfigError(f"input.path {path!r}: no .tar shards found")
    return [prefix + t if prefix and not t.startswith(prefix) else t for t in tars]


def _tar_members(url: str, opts: dict) -> tuple[list[dict], str | None]:
    """Group a tar's members by sample key; each group maps extension -> (offset, size)."""
    groups: dict[str, dict[str, tuple[int, int]]] = {}
    order: list[str] = []
    try:
        with fsspec.open(url, "rb", **opts) as fh, tarfile.open(fileobj=fh, mode="r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                base = os.path.basename(m.name)
                if base.startswith(".") or "." not in base:
                    continue
                prefix = os.path.dirname(m.name)
                stem, ext = base.split(".", 1)
                key = f"{prefix}/{stem}" if prefix else stem
                if key not in groups:
                    groups[key] = {}
                    order.append(key)
                groups[key][ext.lower()] = (m.offset_data, m.size)
    except (tarfile.TarError, OSError, EOFError) as exc:
        return [], f"broken_shard: {type(exc).__name__}: {exc}"
    return [{"_key": k, "_members": groups[k]} for k in order], None


def plan_webdataset(spec: InputSpec, samples_per_shard: int) -> list[dict]:
    tars = list_tars(spec)
    with ThreadPoolExecutor(max_workers=8) as pool:
        listings = list(pool.map(lambda t: _tar_members(t, spec.storage_options), tars))
    width = _key_width([len(m) for m, _ in listings], samples_per_shard)
    rows: list[dict] = []
    for p, (tar, (members, error)) in enumerate(zip(tars, listings)):
        if error:  # one row stands for the whole unreadable shard, so it is counted
            rows.append({SOURCE: tar, REF_PATH: tar, REF_OFFSET: -1, REF_SIZE: -1, CAPTION_REF: None,
                         JSON_REF: None, PLAN_ERROR: error, PARTITION: p, KEY: f"{p:05d}{0:0{width}d}"})
            continue
        for j, m in enumerate(members):
            exts = m["_members"]
            image_ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in exts), None)
            row = {SOURCE: tar, REF_PATH: tar, PARTITION: p, KEY: f"{p:05d}{j:0{width}d}",
                   "source_key": m["_key"], CAPTION_REF: None, JSON_REF: None}
            if image_ext is None:
                row.update({REF_OFFSET: -1, REF_SIZE: -1, PLAN_ERROR: "missing_image: no .jpg/.png/.webp member"})
            else:
                row[REF_OFFSET], row[REF_SIZE] = exts[image_ext]
            if "txt" in exts:
                row[CAPTION_REF] = "tar:%d:%d" % exts["txt"]
            if "json" in exts:
                row[JSON_REF] = "tar:%d:%d" % exts["json"]
            rows.append(row)
    return rows


def plan_videos(spec: InputSpec, videos_per_shard: int) -> list[dict]:
    """One row per video: a folder of videos (optional sidecar .txt captions), or a parquet of
    video paths and captions."""
    if not spec.path.lower().endswith(".parquet") and _list_folder(spec, VIDEO_EXTENSIONS)[0]:
        return plan_images(spec, videos_per_shard, VIDEO_EXTENSIONS)
    return plan_parquet(spec, videos_per_shard)


def plan(spec: InputSpec, samples_per_shard: int, videos_per_shard: int = 16) -> Plan:
    fmt = detect_format(spec)
    if fmt == "videos":
        rows = plan_videos(spec, videos_per_shard)
    elif fmt == "images":
        rows = plan_images(spec, samples_per_shard)
    elif fmt == "laion_parquet":
        rows = plan_parquet(spec, samples_per_shard)
    else:
        rows = plan_webdataset(spec, samples_per_shard)
    if not rows:
        raise ConfigError(f"input.path {spec.path!r}: found no samples to curate")
    for c in (PLAN_ERROR, CAPTION, JSON_REF):
        for r in rows:
            r.setdefault(c, None)
    table = pa.Table.from_pylist(rows)
    parts = table.column(PARTITION).to_numpy()
    uniq, cnt = np.unique(parts, return_counts=True)
    return Plan(table=table, format=fmt, counts={int(p): int(c) for p, c in zip(uniq, cnt)})


# ---- fetching bytes: the first stage of every run ----

def decode_text(data: bytes | None) -> str | None:
    """Caption bytes to text: UTF-8 (with or without BOM), else cp1252, else latin-1; NULs dropped; empty -> None."""
    if data is None:
        return None
    for enc in ("utf-8-sig", "cp1252", "latin-1"):
        try:
            text = data.decode(enc)
            break
        except UnicodeDecodeError:
            continue
    text = text.replace("\x00", "").strip()
    return text or None


def _read_range(fh, offset: int, size: int) -> bytes:
    fh.seek(offset)
    return fh.read(size)


@dataclass
class LoadConfig:
    storage_options: dict[str, Any] = option(help="fsspec options", factory=dict)
    keep_columns: list[str] = option(help="extra img2dataset json fields to carry", factory=list)


class LoadSource(Stage):
    """Fetch each sample's bytes, sidecar caption and img2dataset JSON; unreadable -> rejected."""

    name = "load"
    Config = LoadConfig
    num_cpus = 1.0
    batch_size = 16

    def __init__(self, config: LoadConfig | None = None):
        super().__init__(config or LoadConfig())

    def _open(self, path: str):
        if is_remote(path):
            return fsspec.open(path, "rb", **self.config.storage_options).open()
        return open(path, "rb")

    def __call__(self, batch):
        keep = active(batch)
        n = len(keep)
        raw = column(batch, RAW)
        captions = column(batch, CAPTION)
        errors = column(batch, PLAN_ERROR)
        caption_refs, json_refs = column(batch, CAPTION_REF), column(batch, JSON_REF)
        wanted = tuple(LAION_COLUMNS) + ("url", "original_width", "original_height") + tuple(self.config.keep_columns)
        handles: dict[str, Any] = {}
        try:
            for i in range(n):
                if not keep[i]:
                    continue
                if errors[i]:
                    reject(batch, i, errors[i])
                    continue
                path, off, size = batch[REF_PATH][i], int(batch[REF_OFFSET][i]), int(batch[REF_SIZE][i])
                try:
                    if off < 0:
                        with self._open(path) as fh:
                            raw[i] = fh.read()
                    else:
                        if path not in handles:
                            handles[path] = self._open(path)
                        raw[i] = _read_range(handles[path], off, size)
                        if len(raw[i]) != size:
                            raise EOFError(f"shard ends {size - len(raw[i])} bytes early")
                except FileNotFoundError:
                    reject(batch, i, "missing_file: not found")
                    continue
                except (OSError, EOFError, ValueError) as exc:
                    reject(batch, i, f"read_error: {type(exc).__name__}: {exc}")
                    continue
                cref = caption_refs[i]
                if cref:
                    captions[i] = decode_text(self._read_ref(cref, path, handles))
                elif isinstance(captions[i], bytes):
                    captions[i] = decode_text(captions[i])
                jref = json_refs[i]
                if jref:
                    try:
                        meta = json.loads(decode_text(self._read_ref(jref, path, handles)) or "{}")
                    except (json.JSONDecodeError, OSError):
                        meta = {}
                    if captions[i] is None and isinstance(meta.get("caption"), str):
                        captions[i] = meta["caption"]
                    for c in wanted:
                        if c in meta and not isinstance(meta[c], (dict, list)):
                            column(batch, c)[i] = meta[c]
        finally:
            for fh in handles.values():
                fh.close()
        return batch

    def _read_ref(self, ref: str, tar_path: str, handles: dict) -> bytes | None:
        try:
            if ref.startswith("tar:"):
                _, off, size = ref.split(":")
                if tar_path not in handles:
                    handles[tar_path] = self._open(tar_path)
                return _read_range(handles[tar_path], int(off), int(size))
            with self._open(ref) as fh:
                return fh.read()
        except OSError:
            return None


__all__ = ["InputSpec", "LoadSource", "Plan", "decode_text", "detect_format", "plan"]
