"""Readers: turn an input (folder of images, LAION-style parquet, img2dataset shards) into a plan.

A plan is a table with one row per input sample: its stable ``key``, its ``partition`` (the
output shard it lands in), where to fetch its bytes, and the metadata columns that came with
it. Planning only lists; the bytes are fetched by ``LoadSource``, the first stage of every run.
Keys are img2dataset's: zero-padded partition id followed by the index inside the partition,
so they are stable across re-runs of the same input.
"""
from __future__ import annotations

import base64
import json
import os
import posixpath
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.contract import storage
from pipeline.contract import tar as tars
from pipeline.contract.config import ConfigError, option
from pipeline.contract.inputs import (
    DOWNLOAD_PROTOCOLS,
    InputPolicy,
    InputRejected,
    check_local,
    decode_text,
    display_name,
    encode_fs_path,
    is_inside,
    is_remote,
    read_bounded,
    read_local,
)
from pipeline.contract.layout import read_schema, read_table
from pipeline.contract.schema import (
    CAPTION,
    CAPTION_REF,
    IMAGE_EXTENSIONS,
    JSON_REF,
    KEY,
    LAION_COLUMNS,
    PARTITION,
    PLAN_ERROR,
    RAW,
    REF_OFFSET,
    REF_PATH,
    REF_SIZE,
    SIDECAR_EXTENSIONS,
    SOURCE,
    SOURCE_RAW,
    VIDEO_EXTENSIONS,
)
from pipeline.contract.stage import Stage, active, column, reject

PATH_COLUMN_CANDIDATES = ("path", "filepath", "file_path", "image_path", "file_name", "filename", "URL", "url")
CAPTION_COLUMN_CANDIDATES = ("caption", "TEXT", "text", "prompt", "alt")

@dataclass
class InputSpec:
    path: str = option(
        help="folder of images or videos, a .parquet file or folder of them, or img2dataset .tar shards "
             "(folder, file, glob or {00000..00009} pattern; any fsspec URL)"
    )
    format: Literal["auto", "images", "laion_parquet", "webdataset", "videos"] = option(
        "auto",
        "input kind; auto detects from the path (videos: a folder of video files, or a parquet whose path "
        "column names videos)",
    )
    path_column: str = option(
        "auto", f"parquet column with the image path (auto tries {', '.join(PATH_COLUMN_CANDIDATES)})"
    )
    caption_column: str = option(
        "auto", f"parquet column with the caption (auto tries {', '.join(CAPTION_COLUMN_CANDIDATES)})"
    )
    rename_columns: dict[str, str] = option(
        help="parquet columns to rename on read, e.g. {aesthetic: AESTHETIC_SCORE}", factory=dict
    )
    keep_columns: list[str] = option(
        help="extra parquet/json columns to carry into the annotations (LAION's score columns are always carried)",
        factory=list,
    )
    base_dir: str | None = option(None, "where relative parquet paths are resolved (default: the parquet's folder); "
                                        "every local path a parquet names must lie under it")
    allow_outside_base: bool = option(False, "let parquet rows (and symlinks in a folder) name local files outside "
                                      "base_dir / the input folder; off, such rows are rejected (outside_base)")
    protocols: list[str] = option(help="remote protocols parquet rows may name, e.g. [s3, gcs]; any other URL is a "
                                  "rejected row (http, https and ftp never: downloading is img2dataset's job)",
                                  factory=list)
    max_file_bytes: int = option(256 * 1024 ** 2, "largest image, caption or JSON file read (bytes); bigger files "
                                 "are rejected rows (too_large). Videos are streamed, not read whole", min=1)
    recursive: bool = option(True, "walk sub-folders of an image folder")
    storage_options: dict[str, Any] = option(
        help="fsspec options for remote paths (e.g. anon: true for public S3)", factory=dict
    )

    def __post_init__(self):
        bad = [p for p in self.protocols if p.lower() in DOWNLOAD_PROTOCOLS or not p.isidentifier()]
        if bad:
            raise ConfigError(f"input.protocols: {bad[0]!r} is not allowed; winnow reads storage protocols such as "
                              f"s3, gcs, gs, abfs, hdfs; web URLs ({', '.join(DOWNLOAD_PROTOCOLS)}) are downloaded "
                              f"by img2dataset, whose output folder winnow reads")
        self.protocols = [p.lower() for p in self.protocols]
        storage.check_options(self.storage_options, "input.storage_options")

    def policy(self) -> InputPolicy:
        """What the loading stages may open (local root, protocols, byte cap)."""
        root = None
        if not is_remote(self.path):
            root = self.base_dir or (
                self.path if os.path.isdir(self.path) else os.path.dirname(os.path.abspath(self.path))
            )
            root = os.path.realpath(root)
        return InputPolicy(root=root, allow_outside=self.allow_outside_base, max_file_bytes=self.max_file_bytes,
                           storage_options=dict(self.storage_options))


NOT_DOWNLOADED = ("not_downloaded: {what} is not read by winnow; download with img2dataset and give winnow its "
                  "output folder")

def classify_ref(
    ref, base: str, policy_protocols: list[str], allow_outside: bool = False
) -> tuple[str | None, str | None]:
    """(path to read, plan error) for a path a parquet row names, by the input policy: URLs are read
    only for protocols named in ``input.protocols`` (never web downloads or chained URLs); local paths
    resolve under ``base`` (the root check itself happens when the file is opened)."""
    if not ref or not isinstance(ref, str):
        return None, "missing_file: empty path"
    if "\x00" in ref:
        return None, "missing_file: the path holds a NUL character"
    if "::" in ref.split("/", 1)[0] or ("::" in ref and "://" in ref):
        return ref, NOT_DOWNLOADED.format(what="a chained fsspec URL")
    if "://" in ref and not ref.startswith("file://"):
        proto = ref.split("://", 1)[0].lower()
        if proto in DOWNLOAD_PROTOCOLS:
            return ref, NOT_DOWNLOADED.format(what=f"a {proto} URL")
        if proto not in policy_protocols:
            return ref, f"protocol_not_allowed: {proto}:// (add {proto} to input.protocols to read it)"
        return ref, None
    if ref.startswith("file://"):
        ref = ref[len("file://"):]
    if is_remote(base):          # a remote parquet: its relative paths stay under its folder, remote too
        proto, root = base.split("://", 1)
        if os.path.isabs(ref):
            return ref, None if allow_outside else f"outside_base: {ref} is a local path; {base} is remote"
        joined = posixpath.normpath(posixpath.join(root, ref))
        if not allow_outside and not (joined + "/").startswith(root.rstrip("/") + "/"):
            return ref, f"outside_base: {ref} is outside {base} (set input.allow_outside_base: true to read it)"
        return f"{proto}://{joined}", None
    return (ref if os.path.isabs(ref) else os.path.join(base, ref)), None


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
        try:
            names = storage.find(path) if not spec.storage_options else \
                fsspec.core.url_to_fs(path, **spec.storage_options)[0].find(path)
        except OSError as exc:
            raise ConfigError(
                f"input.path {path!r} cannot be listed: {storage.redact(str(exc)).splitlines()[0]}"
            ) from None
        if not names:
            raise ConfigError(f"input.path {path!r} holds nothing (no object under that prefix); check the URL")
    else:
        if not os.path.exists(path):
            raise ConfigError(
                f"input.path {path!r} does not exist; point it at a folder of images, a parquet file or "
                "img2dataset shards"
            )
        if os.path.isfile(path):
            raise ConfigError(
                f"input.path {path!r} is a file of an unknown kind; set input.format to one of images, "
                "laion_parquet, webdataset"
            )
        names = [os.path.join(d, f) for d, _, fs_ in os.walk(path) for f in fs_]
    if any(n.endswith(".tar") for n in names):
        return "webdataset"
    images = any(n.lower().endswith(IMAGE_EXTENSIONS) for n in names)
    videos = any(n.lower().endswith(VIDEO_EXTENSIONS) for n in names)
    if images and videos:
        raise ConfigError(f"input.path {path!r} holds both images and videos; set input.format to images or videos "
                          f"(files of the other kind become rejected rows, unsupported_format), or split the folder")
    if images:
        return "images"
    if videos:
        return "videos"
    parquets = sorted(n for n in names if n.endswith(".parquet"))
    if parquets:
        if is_remote(path):
            parquets = [f"{storage.protocol(path)}://{n}" if "://" not in n else n for n in parquets]
        return "videos" if _parquet_names_videos(spec, parquets[:1]) else "laion_parquet"
    raise ConfigError(
        f"input.path {path!r} holds no images, videos, parquet or .tar files; set input.format or check the path"
    )


def _parquet_names_videos(spec: InputSpec, files: list[str]) -> bool:
    """Whether a parquet's path column points at video files (its first 100 rows)."""
    try:
        with storage.open_read(files[0]) as fh:
            pf = pq.ParquetFile(fh)
            table = pf.read_row_group(0) if pf.num_row_groups else None
    except Exception:  # noqa: BLE001 - unreadable here: planning reports it properly
        return False
    if table is None:
        return False
    cols = [spec.rename_columns.get(c, c) for c in table.column_names]
    table = table.rename_columns(cols)
    col = (
        spec.path_column if spec.path_column != "auto" else next((c for c in PATH_COLUMN_CANDIDATES if c in cols), None)
    )
    if col not in cols:
        return False
    values = [v for v in table.column(col).slice(0, 100).to_pylist() if isinstance(v, str)]
    return bool(values) and sum(v.lower().endswith(VIDEO_EXTENSIONS) for v in values) > len(values) / 2


@dataclass
class Plan:
    table: pa.Table | None       # one row per input sample; None: ``streamed`` makes the rows in Ray tasks
    format: str
    counts: dict[int, int]       # partition -> number of inputs
    sidecars: int = 0            # caption / JSON files read beside the samples (not samples themselves)
    streamed: StreamedParquet | None = None

    @property
    def num_inputs(self) -> int:
        return self.streamed.num_rows if self.table is None else self.table.num_rows


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


def _walk(spec: InputSpec) -> list[str]:
    """Every non-folder entry under the input folder (files, FIFOs, devices, links), sorted by bytes."""
    root = spec.path
    files = []
    if is_remote(root):
        prefix = root.rstrip("/") + "/"
        found = storage.find(root)
        return [f for f in found if spec.recursive or "/" not in f[len(prefix):]]
    if spec.recursive:
        for d, dirs, names in os.walk(root):
            dirs.sort()
            files += [os.path.join(d, n) for n in names]
    else:
        files = [os.path.join(root, n) for n in os.listdir(root) if not os.path.isdir(os.path.join(root, n))]
    return sorted(files, key=os.fsencode)


def _list_folder(spec: InputSpec, extensions: tuple[str, ...]) -> tuple[list[str], set[str]]:
    files = _walk(spec)
    return [f for f in files if f.lower().endswith(extensions)], set(files)


def split_sidecars(files: list[str]) -> tuple[list[str], list[str]]:
    """(samples, sidecars): ``NAME.txt`` / ``NAME.json`` / ``NAME.caption`` beside another file of the
    same stem is that file's sidecar; every other file is a sample (a text file alone is a sample that
    decoding rejects, so it is counted)."""
    stems = {os.path.splitext(f)[0] for f in files if not f.lower().endswith(SIDECAR_EXTENSIONS)}
    sidecars = [f for f in files if f.lower().endswith(SIDECAR_EXTENSIONS) and os.path.splitext(f)[0] in stems]
    taken = set(sidecars)
    return [f for f in files if f not in taken], sidecars


def plan_folder(spec: InputSpec, samples_per_shard: int, kind: str) -> tuple[list[dict], int]:
    """One row per file of the folder (its sidecars excepted, which are counted). Files are told apart
    by content when they are decoded, not by an extension list; in a video run, image files are
    rejected rows (``unsupported_format``)."""
    root = spec.path
    files, sidecars = split_sidecars(_walk(spec))
    captions = {f for f in sidecars if f.lower().endswith(".txt")}
    rows = []
    for f in files:
        sidecar = os.path.splitext(f)[0] + ".txt"
        rel = f[len(root.rstrip("/")) + 1:] if is_remote(root) else os.path.relpath(f, root)
        row = {SOURCE: display_name(rel), REF_PATH: encode_fs_path(f), REF_OFFSET: -1,
               REF_SIZE: -1, CAPTION_REF: encode_fs_path(sidecar) if sidecar in captions else None}
        if row[SOURCE] != rel:          # not UTF-8: the exact bytes too, base64 (``source`` shows \xNN escapes)
            row[SOURCE_RAW] = base64.b64encode(os.fsencode(rel)).decode("ascii")
        if kind == "videos" and f.lower().endswith(IMAGE_EXTENSIONS):
            row[PLAN_ERROR] = f"unsupported_format: {os.path.splitext(f)[1].lower()} is an image in a video run"
        rows.append(row)
    return _assign(rows, samples_per_shard), len(sidecars)


def _pick(columns: list[str], wanted: str, candidates: tuple[str, ...], what: str, path: str) -> str | None:
    if wanted != "auto":
        if wanted not in columns:
            raise ConfigError(f"input.{what}: column {wanted!r} is not in {path} (columns: {', '.join(columns)})")
        return wanted
    for c in candidates:
        if c in columns:
            return c
    return None


PLAN_CHUNK = 65_536     # rows classified at a time: the driver never holds a Python object per input row


def _classify_column(refs, base: str, cols: ParquetColumns) -> tuple[pa.Array, pa.Array]:
    """(ref_path, plan_error) of every row, ``classify_ref`` chunk by chunk."""
    paths: list[pa.Array] = []
    errors: list[pa.Array] = []
    for start in range(0, len(refs), PLAN_CHUNK):
        out = [classify_ref(r, base, list(cols.protocols), cols.allow_outside)
               for r in refs.slice(start, PLAN_CHUNK).to_pylist()]
        paths.append(pa.array([p for p, _ in out], pa.string()))
        errors.append(pa.array([e for _, e in out], pa.string()))
    if not paths:
        return pa.array([], pa.string()), pa.array([], pa.string())
    return pa.concat_arrays(paths), pa.concat_arrays(errors)


@dataclass(frozen=True)
class ParquetColumns:
    """What the plan reads from one parquet file: the file's column names (before ``rename_columns``)
    in ``read``, their names after it in ``wanted``."""
    file: str
    read: tuple[str, ...]
    wanted: tuple[str, ...]
    path_col: str
    cap_col: str | None
    carry: tuple[str, ...]
    base: str
    protocols: tuple[str, ...]
    allow_outside: bool


def parquet_columns(spec: InputSpec, f: str, names: list[str] | None = None) -> ParquetColumns:
    """The columns of ``f`` the plan keeps (path, caption, LAION's and ``keep_columns``), by its schema
    alone; a file without a path column, or without a kept column, is a config error."""
    if names is None:
        try:        # the schema first, then only the columns the plan keeps (a LAION file has ~20)
            names = read_schema(f).names
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(f"input.path: cannot read parquet {f!r}: {exc}") from None
    renamed = {spec.rename_columns.get(c, c): c for c in names}
    cols = list(renamed)
    path_col = _pick(cols, spec.path_column, PATH_COLUMN_CANDIDATES, "path_column", f)
    if path_col is None:
        raise ConfigError(
            f"input.path_column: none of {PATH_COLUMN_CANDIDATES} is in {f}; set input.path_column to the "
            f"column holding image paths (columns: {', '.join(cols)})"
        )
    cap_col = _pick(cols, spec.caption_column, CAPTION_COLUMN_CANDIDATES, "caption_column", f)
    carry = [c for c in dict.fromkeys(list(LAION_COLUMNS) + list(spec.keep_columns)) if c in cols]
    missing = [c for c in spec.keep_columns if c not in cols]
    if missing:
        raise ConfigError(f"input.keep_columns: {missing} not in {f} (columns: {', '.join(cols)})")
    wanted = list(dict.fromkeys([path_col] + ([cap_col] if cap_col else []) + carry))
    base = spec.base_dir or (posixpath.dirname(f) if is_remote(f) else os.path.dirname(os.path.abspath(f)))
    return ParquetColumns(f, tuple(renamed[c] for c in wanted), tuple(wanted), path_col, cap_col, tuple(carry), base,
                          tuple(spec.protocols), spec.allow_outside_base)


def _text_refs(refs) -> pa.ChunkedArray | pa.Array:
    if pa.types.is_string(refs.type) or pa.types.is_large_string(refs.type):
        return refs
    return pa.array([r if isinstance(r, str) else None for r in refs.to_pylist()], pa.string())  # not text: empty


def parquet_rows(table: pa.Table, cols: ParquetColumns) -> pa.Table:
    """Plan rows (no partition or key yet) for rows of ``cols.file`` read with ``cols.read``."""
    table = table.rename_columns(list(cols.wanted))
    n = table.num_rows
    refs = _text_refs(table.column(cols.path_col))
    ref_path, plan_error = _classify_column(refs, cols.base, cols)
    caption = _text_column(table.column(cols.cap_col)) if cols.cap_col else pa.nulls(n, pa.string())
    out = {SOURCE: pa.array([os.path.basename(cols.file)], pa.string()).take(pa.array(np.zeros(n, np.int64))),
           REF_OFFSET: pa.array(np.full(n, -1, np.int64)), REF_SIZE: pa.array(np.full(n, -1, np.int64)),
           CAPTION_REF: pa.nulls(n, pa.string()), CAPTION: caption}
    for c in cols.carry:
        out[c] = table.column(c)
    if cols.path_col.lower() == "url":
        out["url"] = refs
    out[REF_PATH], out[PLAN_ERROR] = ref_path, plan_error
    return pa.table(out)


def _parquet_files(path: str) -> list[str]:
    files = storage.find(path, ".parquet") if storage.isdir(path) else [path]
    if not files:
        raise ConfigError(f"input.path {path!r}: no .parquet files found")
    return files


def plan_parquet(spec: InputSpec, samples_per_shard: int) -> pa.Table:
    """The rows of a parquet of paths (LAION metadata, a list of videos), as columns: Arrow holds
    them (tens of bytes a row); no Python dict per row. A LAION parquet given to ``winnow curate``
    is planned by the tasks that read it instead (``StreamedParquet``)."""
    tables: list[pa.Table] = []
    for f in _parquet_files(spec.path):
        cols = parquet_columns(spec, f)
        try:
            table = read_table(f, columns=list(cols.read))
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(f"input.path: cannot read parquet {f!r}: {exc}") from None
        tables.append(parquet_rows(table, cols))
    rows = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    _check_base(spec, rows)
    return _assign_table(rows, samples_per_shard)


def _text_column(col: pa.ChunkedArray) -> pa.ChunkedArray | pa.Array:
    """A caption column as text: strings as they are; anything else (numbers, bytes that are not
    UTF-8) as text where it is text, else null."""
    try:
        return pc.cast(col, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return pa.array([v if isinstance(v, str) else None for v in col.to_pylist()], pa.string())


def _assign_table(table: pa.Table, samples_per_shard: int, numbers: np.ndarray | None = None) -> pa.Table:
    """``_assign`` on a table whose rows are input rows ``numbers`` (default: 0, 1, ...): partition
    and key from the row number, in Arrow."""
    width = _key_width([], samples_per_shard)
    if numbers is None:
        numbers = np.arange(table.num_rows, dtype=np.int64)
    part, j = np.divmod(numbers, samples_per_shard)
    pad = pc.utf8_lpad
    key = pc.binary_join_element_wise(pad(pc.cast(pa.array(part), pa.string()), 5, "0"),
                                      pad(pc.cast(pa.array(j), pa.string()), width, "0"), "")
    return table.append_column(PARTITION, pa.array(part)).append_column(KEY, key)


def row_numbers(keys: pa.Array, samples_per_shard: int) -> np.ndarray:
    """The input row numbers of keys ``_assign_table`` made, sorted (a resumed run's done rows)."""
    width = _key_width([], samples_per_shard)
    keys = pc.cast(keys, pa.string())
    part = pc.cast(pc.utf8_slice_codeunits(keys, 0, -width), pa.int64()).to_numpy()
    j = pc.cast(pc.utf8_slice_codeunits(keys, -width, 2 ** 31 - 1), pa.int64()).to_numpy()
    return np.sort(part * samples_per_shard + j)


def partition_of_keys(keys: list[str], samples_per_shard: int) -> dict[str, int]:
    """key -> partition for keys ``_assign_table`` made (the partition, then the row in it at a fixed width)."""
    width = _key_width([], samples_per_shard)
    return {k: int(k[:-width]) for k in keys}


def _check_base(spec: InputSpec, rows: pa.Table) -> None:
    """A parquet whose local paths *all* lie outside the allowed folder is a config mistake (LAION
    metadata in one folder, images in a sibling), not a file of hostile rows: say so before Ray starts."""
    _check_paths(spec, iter([rows]))


def _check_paths(spec: InputSpec, chunks) -> None:
    """``_check_base`` over plan rows that come in chunks (tables): it stops at the first local path
    inside the folder, so a good input is read no further than its first usable path."""
    root = spec.policy().root
    if root is None or spec.allow_outside_base:
        return
    roots = {os.path.realpath(root), os.path.normpath(os.path.abspath(root))}   # before / after symlinks
    count, first = 0, None
    for rows in chunks:
        usable = rows.filter(pc.and_(pc.is_null(rows.column(PLAN_ERROR)), pc.is_valid(rows.column(REF_PATH))))
        for p in usable.column(REF_PATH).to_pylist():
            if not p or is_remote(p):
                continue
            count += 1
            first = first or p
            if any(is_inside(os.path.normpath(p), r) for r in roots):
                return
    if first is None:
        return
    raise ConfigError(f"input: all {count} local paths in {spec.path!r} lie outside {root} (first: "
                      f"{first}); set input.base_dir to a folder that holds the images (paths resolve "
                      f"under it), or input.allow_outside_base: true")


# ---- a LAION parquet planned by the tasks that read it ----

PIECE_ROWS = 262_144     # rows of whole row groups one planning task reads (a larger row group is one piece)


@dataclass(frozen=True)
class Piece:
    """Row groups ``groups`` of one file, whose first row is input row ``offset``."""
    file: int            # index into ``StreamedParquet.files``
    groups: tuple[int, ...]
    offset: int
    rows: int


@dataclass
class StreamedParquet:
    """A LAION-style parquet's plan as the driver holds it: per file its columns and per row group
    its row count, nothing per row. ``blocks`` (run in Ray tasks, ``adapter.plan_blocks``) reads a
    piece's rows, classifies their refs, numbers them as ``plan_parquet`` does (partition and key
    from the input row number) and yields them in blocks; the driver never holds the rows, so its
    memory does not grow with the input (bench/scale.py, curate)."""
    files: list[ParquetColumns]
    pieces: list[Piece]
    schema: pa.Schema              # every block is cast to it (files may differ in carried columns)
    num_rows: int
    samples_per_shard: int

    @property
    def counts(self) -> dict[int, int]:
        n, s = self.num_rows, self.samples_per_shard
        return {p: min(s, n - p * s) for p in range(-(-n // s))}

    def read(self, piece: Piece, chunk: int = PLAN_CHUNK, drop: np.ndarray | None = None,
             finished: np.ndarray | None = None, only: np.ndarray | None = None):
        """Plan rows of ``piece`` (numbered), ``chunk`` rows at a time, leaving out before any work
        the row numbers in ``drop`` (sorted), the partitions in ``finished``, and with ``only``
        (sorted) every row not in it."""
        cols = self.files[piece.file]
        offset = piece.offset
        sps = self.samples_per_shard
        with storage.open_read(cols.file) as fh:
            pf = pq.ParquetFile(fh)
            for batch in pf.iter_batches(batch_size=chunk, row_groups=list(piece.groups), columns=list(cols.read)):
                numbers = np.arange(offset, offset + batch.num_rows, dtype=np.int64)
                offset += batch.num_rows
                mask = np.ones(len(numbers), bool)
                for wanted, values in ((False, drop), (True, only)):
                    if values is not None:
                        lo, hi = np.searchsorted(values, [numbers[0], numbers[-1] + 1])
                        mask &= np.isin(numbers, values[lo:hi]) == wanted
                if finished is not None and len(finished):
                    mask &= ~np.isin(numbers // sps, finished)
                table = pa.Table.from_batches([batch])
                if not mask.all():
                    if not mask.any():
                        continue
                    table, numbers = table.filter(pa.array(mask)), numbers[mask]
                yield self._conform(_assign_table(parquet_rows(table, cols), sps, numbers=numbers))

    def _conform(self, rows: pa.Table) -> pa.Table:
        cols = [rows.column(f.name) if f.name in rows.column_names else pa.nulls(rows.num_rows, f.type)
                for f in self.schema]
        return pa.table(cols, schema=self.schema) if all(c.type == f.type for c, f in zip(cols, self.schema,
                                                                                         strict=True)) \
            else pa.table(cols, names=self.schema.names).cast(self.schema)

    def blocks(self, piece: Piece, block_rows: int, done_rows: np.ndarray | None, finished: list[int]):
        """The piece's plan rows left to annotate (row numbers not in ``done_rows``, sorted; not in a
        ``finished`` partition), in blocks of ``block_rows`` (``adapter.plan_blocks``)."""
        chunk = block_rows * max(1, PLAN_CHUNK // block_rows)
        held: list[pa.Table] = []
        n_held = 0
        for rows in self.read(piece, chunk, drop=done_rows, finished=np.asarray(finished, np.int64)):
            held.append(rows)
            n_held += rows.num_rows
            while n_held >= block_rows:
                table = pa.concat_tables(held)
                yield table.slice(0, block_rows).combine_chunks()
                rest = table.slice(block_rows)
                held, n_held = [rest], rest.num_rows
        if n_held:
            yield pa.concat_tables(held).combine_chunks()

    def take(self, idx: list[int]) -> pa.Table:
        """The plan rows at input row numbers ``idx``, reading only the pieces that hold them and
        classifying only those rows (the dry run's sample)."""
        only = np.unique(np.asarray(idx, np.int64))
        out = [rows for piece in self.pieces
               if ((only >= piece.offset) & (only < piece.offset + piece.rows)).any()
               for rows in self.read(piece, only=only)]
        table = pa.concat_tables(out) if out else self.schema.empty_table()
        return table.take(pa.array(np.searchsorted(only, np.asarray(idx, np.int64))))   # rows come in ``only``'s order


def plan_parquet_streamed(spec: InputSpec, samples_per_shard: int) -> StreamedParquet:
    """A LAION parquet's plan for Ray tasks to make (``StreamedParquet``): schemas and footers read
    here, and the paths as far as ``_check_base`` needs (usually the first chunk)."""
    files: list[ParquetColumns] = []
    pieces: list[Piece] = []
    schemas: list[pa.Schema] = []
    offset = 0
    for f in _parquet_files(spec.path):
        try:
            with storage.open_read(f) as fh:
                pf = pq.ParquetFile(fh)
                meta, arrow_schema = pf.metadata, pf.schema_arrow
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(f"input.path: cannot read parquet {f!r}: {exc}") from None
        cols = parquet_columns(spec, f, arrow_schema.names)
        files.append(cols)
        run: list[int] = []
        run_rows = 0
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            if run and run_rows + n > PIECE_ROWS:
                pieces.append(Piece(len(files) - 1, tuple(run), offset, run_rows))
                offset += run_rows
                run, run_rows = [], 0
            run.append(g)
            run_rows += n
        if run_rows:
            pieces.append(Piece(len(files) - 1, tuple(run), offset, run_rows))
            offset += run_rows
        empty = pa.table({c: pa.array([], arrow_schema.field(r).type) for c, r in zip(cols.wanted, cols.read,
                                                                                         strict=True)})
        schemas.append(_assign_table(parquet_rows(empty.rename_columns(list(cols.read)), cols),
                                     samples_per_shard).schema)
    schema = pa.unify_schemas(schemas, promote_options="permissive") if schemas else pa.schema([])
    if JSON_REF not in schema.names:      # as ``plan`` gives every plan
        schema = schema.append(pa.field(JSON_REF, pa.string()))
    plan = StreamedParquet(files, pieces, schema, offset, samples_per_shard)
    if plan.num_rows:
        _check_paths(spec, (rows for piece in plan.pieces for rows in plan.read(piece)))
    return plan


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


TAR_IMAGE_EXTS = tuple(e[1:] for e in IMAGE_EXTENSIONS)


def _tar_members(url: str, opts: dict) -> tuple[list, str | None]:
    """A tar's samples and stray image members, by webdataset's key rule (``pipeline.contract.tar``)."""
    try:
        with fsspec.open(url, "rb", **opts) as fh:
            items = tars.group(list(tars.scan(fh)), TAR_IMAGE_EXTS)
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        return [], f"broken_shard: {type(exc).__name__}: {exc}"
    return items, None


IMG2DATASET_STATUS = ("success", "failed_to_download", "failed_to_resize")


def _img2dataset_failures(tar: str, opts: dict) -> list[dict]:
    """img2dataset writes ``NNNNN.parquet`` beside each tar with a row per URL of the shard, failed
    ones included (``status``, ``error_message``); those rows become rejected rows here, so the funnel
    starts at the URL count. A parquet that is not img2dataset's (a winnow run's) is left alone."""
    path = tar[:-len(".tar")] + ".parquet"
    try:
        with fsspec.open(path, "rb", **opts) as fh:
            table = pq.read_table(fh)
    except (OSError, pa.ArrowException, ValueError):
        return []
    names = table.column_names
    if not {"key", "status"} <= set(names):
        return []
    rows = table.select([c for c in ("key", "status", "error_message", "url", "caption") if c in names]).to_pylist()
    if not rows or any(r["status"] not in IMG2DATASET_STATUS for r in rows):
        return []
    return [r for r in rows if r["status"] != "success"]


def plan_webdataset(spec: InputSpec, samples_per_shard: int) -> list[dict]:
    """One row per sample of each shard, plus one rejected row per image member that is not its
    sample's one image (``duplicate_member``, ``ambiguous_key``): every image member is counted."""
    tars_ = list_tars(spec)
    with ThreadPoolExecutor(max_workers=8) as pool:
        listings = list(pool.map(lambda t: _tar_members(t, spec.storage_options), tars_))
        failures = list(pool.map(lambda t: _img2dataset_failures(t, spec.storage_options), tars_))
    width = _key_width([len(m) + len(f) for (m, _), f in zip(listings, failures, strict=True)], samples_per_shard)
    rows: list[dict] = []
    for p, (tar, (items, error)) in enumerate(zip(tars_, listings, strict=True)):
        if error:  # one row stands for the whole unreadable shard, so it is counted
            rows.append({SOURCE: tar, REF_PATH: tar, REF_OFFSET: -1, REF_SIZE: -1, CAPTION_REF: None,
                         JSON_REF: None, PLAN_ERROR: error, PARTITION: p, KEY: f"{p:05d}{0:0{width}d}"})
            continue
        for j, item in enumerate(items):
            row = {SOURCE: tar, REF_PATH: tar, PARTITION: p, KEY: f"{p:05d}{j:0{width}d}", CAPTION_REF: None,
                   JSON_REF: None}
            if isinstance(item, tars.Stray):
                row.update({"source_key": display_name(item.member.name), REF_OFFSET: -1, REF_SIZE: -1,
                            PLAN_ERROR: display_name(item.reason)})
                rows.append(row)
                continue
            row["source_key"] = display_name(item.key)
            if item.media is None:
                row.update({REF_OFFSET: -1, REF_SIZE: -1, PLAN_ERROR: "missing_image: no .jpg/.png/.webp member"})
            else:
                row[REF_OFFSET], row[REF_SIZE] = item.media.data, item.media.size
            if "txt" in item.members:
                row[CAPTION_REF] = f"tar:{item.members['txt'].data}:{item.members['txt'].size}"
            if "json" in item.members:
                row[JSON_REF] = f"tar:{item.members['json'].data}:{item.members['json'].size}"
            rows.append(row)
        for j, f in enumerate(failures[p], start=len(items)):
            rows.append(
                {
                    SOURCE: tar,
                    REF_PATH: tar,
                    PARTITION: p,
                    KEY: f"{p:05d}{j:0{width}d}",
                    CAPTION_REF: None,
                    JSON_REF: None,
                    REF_OFFSET: -1,
                    REF_SIZE: -1,
                    "source_key": str(f["key"]),
                    "url": f.get("url"),
                    CAPTION: f.get("caption"),
                    PLAN_ERROR: f"not_downloaded: img2dataset {f['status']}: {f.get('error_message') or ''}".rstrip(
                        ": "
                    ),
                }
            )
    # img2dataset's keys stay the keys when they name every row once and are safe member names, so
    # a join on ``key`` with img2dataset's parquet is right; otherwise rows are numbered (NNNNN + index
    # in the shard) and the join is on (source, source_key)
    src = [r.get("source_key") for r in rows]
    if all(isinstance(k, str) and not tars.unsafe_name(k) for k in src) and len(set(src)) == len(src):
        for r in rows:
            r[KEY] = r["source_key"]
    return rows


def plan(spec: InputSpec, samples_per_shard: int, videos_per_shard: int = 16, stream: bool = False) -> Plan:
    """``stream``: a LAION parquet's rows are left for Ray tasks to read and number
    (``StreamedParquet``); the plan then holds no table."""
    fmt = detect_format(spec)
    sidecars = 0
    if fmt == "laion_parquet" and stream:
        streamed = plan_parquet_streamed(spec, samples_per_shard)
        if not streamed.num_rows:
            raise ConfigError(f"input.path {spec.path!r}: found no samples to curate")
        return Plan(table=None, format=fmt, counts=streamed.counts, streamed=streamed)
    folder = not spec.path.lower().endswith(".parquet") and storage.isdir(spec.path)
    if fmt == "videos" and folder and _list_folder(spec, VIDEO_EXTENSIONS)[0]:
        rows, sidecars = plan_folder(spec, videos_per_shard, "videos")
    elif fmt == "videos":
        rows = plan_parquet(spec, videos_per_shard)
    elif fmt == "images":
        rows, sidecars = plan_folder(spec, samples_per_shard, "images")
    elif fmt == "laion_parquet":
        rows = plan_parquet(spec, samples_per_shard)
    else:
        rows = plan_webdataset(spec, samples_per_shard)
    if (rows.num_rows if isinstance(rows, pa.Table) else len(rows)) == 0:
        raise ConfigError(f"input.path {spec.path!r}: found no samples to curate")
    if isinstance(rows, pa.Table):
        table = rows
        for c in (PLAN_ERROR, CAPTION, JSON_REF):
            if c not in table.column_names:
                table = table.append_column(c, pa.nulls(table.num_rows, pa.string()))
    else:
        names = dict.fromkeys([PLAN_ERROR, CAPTION, JSON_REF])
        for r in rows:               # Arrow takes the schema from the first row: give every row every column
            names.update(dict.fromkeys(r))
        for r in rows:
            for c in names:
                r.setdefault(c, None)
        table = pa.Table.from_pylist(rows)
    parts = table.column(PARTITION).to_numpy()
    uniq, cnt = np.unique(parts, return_counts=True)
    return Plan(
        table=table, format=fmt, counts={int(p): int(c) for p, c in zip(uniq, cnt, strict=True)}, sidecars=sidecars
    )


# ---- fetching bytes: the first stage of every run ----

def _read_range(fh, offset: int, size: int) -> bytes:
    fh.seek(offset)
    return fh.read(size)


@dataclass
class LoadConfig:
    policy: InputPolicy = field(default_factory=InputPolicy)
    keep_columns: list[str] = option(help="extra img2dataset json fields to carry", factory=list)


class LoadSource(Stage):
    """Fetch each sample's bytes, sidecar caption and img2dataset JSON under the input policy;
    unreadable or refused -> rejected."""

    name = "load"
    Config = LoadConfig
    num_cpus = 1.0
    batch_size = 16

    def __init__(self, config: LoadConfig | None = None):
        super().__init__(config or LoadConfig())

    def _open_remote(self, path: str):
        if not self.config.policy.storage_options:
            return storage.open_read(path)       # the process's options (endpoint), retries
        return fsspec.open(path, "rb", **self.config.policy.storage_options).open()

    def _read(self, path: str, off: int, size: int, handles: dict) -> bytes:
        """A whole file (off < 0) or a byte range of a tar shard, bounded by the policy."""
        policy = self.config.policy
        if off >= 0 and size > policy.max_file_bytes:
            raise InputRejected(f"too_large: {size} bytes > input.max_file_bytes {policy.max_file_bytes}")
        if not is_remote(path):
            if off < 0:
                return read_local(path, policy)
            if path not in handles:            # a shard the spec names (no root to check): opened once per batch
                handles[path] = open(check_local(path, InputPolicy()), "rb")
            return _read_range(handles[path], off, size)
        if off < 0:
            if not policy.storage_options:       # one GET, bounded
                try:
                    return storage.read_bytes(path, limit=policy.max_file_bytes)
                except ValueError:
                    raise InputRejected(f"too_large: more than input.max_file_bytes {policy.max_file_bytes} "
                                        f"bytes") from None
            with self._open_remote(path) as fh:
                return read_bounded(fh, policy.max_file_bytes)
        if path not in handles:
            handles[path] = self._open_remote(path)
        return _read_range(handles[path], off, size)

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
                    raw[i] = self._read(path, off, size, handles)
                    if off >= 0 and len(raw[i]) != size:
                        raise EOFError(f"shard ends {size - len(raw[i])} bytes early")
                except (InputRejected, OSError, EOFError, ValueError, MemoryError) as exc:
                    if storage.transient(exc):
                        raise     # the store did not answer within its retries: fail the task, lose no row
                    reject(batch, i, str(exc) if isinstance(exc, InputRejected) else
                           "missing_file: not found" if isinstance(exc, FileNotFoundError) else
                           f"read_error: {type(exc).__name__}: {exc}")
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
                    except (json.JSONDecodeError, OSError, RecursionError):
                        meta = {}
                    if not isinstance(meta, dict):
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
        """A caption or JSON: ``tar:OFFSET:SIZE`` inside the sample's shard, or a sidecar file."""
        try:
            if ref.startswith("tar:"):
                _, off, size = ref.split(":")
                return self._read(tar_path, int(off), int(size), handles)
            return self._read(ref, -1, -1, handles)
        except (OSError, ValueError, InputRejected) as exc:
            if storage.transient(exc):
                raise     # a store that stays away fails the task rather than drop the caption
            return None


__all__ = ["InputSpec", "LoadSource", "Plan", "classify_ref", "detect_format", "plan"]
