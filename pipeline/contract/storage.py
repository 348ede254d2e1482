"""Where winnow's data lives: a local folder or an object store (``s3://``, ``gs://``, ``az://`` and
whatever else fsspec opens), behind one set of calls. Every path a user gives goes through these.

Object stores have no rename and no append, so the commit rule is the same everywhere: an object is
written whole under its final key (one PUT, or a multipart upload completed last, aborted on error)
or not at all; a marker that vouches for a set of objects is written after them; a reader treats
anything without its marker as absent. Locally the same rule is a temporary name, fsync, rename.

Credentials come from the standard chains (``AWS_*`` variables, profiles, instance roles, Google
ADC) and never pass through winnow's files: options that are not secrets (an endpoint, a region,
``anon``) may come from ``WINNOW_STORAGE_OPTIONS`` (JSON: protocol -> options) or a spec's
``storage_options``, and ``secret_values`` / ``redact`` keep the secrets out of what winnow prints.
"""
from __future__ import annotations

import contextlib
import json
import os
import posixpath
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import IO

OPTIONS_ENV = "WINNOW_STORAGE_OPTIONS"
SCRATCH_ENV = "WINNOW_SCRATCH"
RETRY_SECONDS_ENV = "WINNOW_STORAGE_RETRY_S"
# option names that hold credentials: refused in specs (they would be written into spec.yaml)
SECRET_OPTIONS = ("key", "secret", "token", "password", "aws_access_key_id", "aws_secret_access_key",
                  "aws_session_token", "account_key", "sas_token", "client_secret", "credentials")
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "AZURE_STORAGE_KEY",
              "AZURE_STORAGE_SAS_TOKEN", "AZURE_CLIENT_SECRET", "GOOGLE_APPLICATION_CREDENTIALS_JSON")
PART_BYTES = 16 * 1024 ** 2        # multipart upload part size for streamed writes (S3's minimum is 5 MiB)
_options: dict[str, dict] = {}     # protocol -> options set in this process (``configure``)


class StorageError(OSError):
    """A store that cannot be reached or used (missing bucket, wrong endpoint, denied); one line."""


# ---- names ----

def is_url(path: str) -> bool:
    """A path fsspec must open (``scheme://...``), as opposed to a local path or ``file://``."""
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def local(path: str) -> str:
    """A local path (``file://`` stripped)."""
    return path[len("file://"):] if path.startswith("file://") else path


def protocol(path: str) -> str:
    return path.split("://", 1)[0].lower() if is_url(path) else "file"


def join(base: str, *parts: str) -> str:
    if is_url(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts if p)])
    return os.path.join(local(base), *parts)


def parent(path: str) -> str:
    if is_url(path):
        scheme, rest = path.split("://", 1)
        return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}"
    return os.path.dirname(local(path))


def name(path: str) -> str:
    return posixpath.basename(path.rstrip("/")) if is_url(path) else os.path.basename(local(path))


def absolute(path: str) -> str:
    """A path as winnow records it: a URL as given, a local path made absolute."""
    return path.rstrip("/") if is_url(path) else os.path.abspath(local(path))


def is_inside(child: str, parent_: str) -> bool:
    """Whether ``child`` is ``parent_`` or lies under it (the same store; names, not links)."""
    if is_url(child) != is_url(parent_):
        return False
    if is_url(child):
        c, p = child.rstrip("/") + "/", parent_.rstrip("/") + "/"
        return c.startswith(p)
    c, p = os.path.realpath(local(child)), os.path.realpath(local(parent_))
    return c == p or c.startswith(p.rstrip(os.sep) + os.sep)


# ---- configuration and credentials ----

def check_options(options: dict, where: str) -> dict:
    """Options from a spec: refuse credentials (a spec is copied into the run folder), keep the rest."""
    from pipeline.contract.errors import ConfigError

    if not isinstance(options, dict):
        raise ConfigError(f"{where}: give a mapping of fsspec options (endpoint_url, region, anon ...)")
    flat = {k: v for k, v in options.items()}
    for v in options.values():
        if isinstance(v, dict):
            flat.update(v)
    bad = sorted(k for k in flat if str(k).lower() in SECRET_OPTIONS)
    if bad:
        raise ConfigError(f"{where}: {bad[0]!r} is a credential; winnow copies specs into the output, so give "
                          f"credentials through the standard chain instead (AWS_ACCESS_KEY_ID / "
                          f"AWS_SECRET_ACCESS_KEY, a profile or instance role; Google ADC)")
    return options


def configure(options: dict[str, dict] | None) -> None:
    """Set this process's options per protocol (``{"s3": {"endpoint_url": ...}}``) and export them
    in ``WINNOW_STORAGE_OPTIONS`` so Ray workers started after this see them too."""
    if not options:
        return
    _options.update({str(k).lower(): dict(v) for k, v in options.items()})
    os.environ[OPTIONS_ENV] = json.dumps(_options, sort_keys=True)


def options_for(proto: str) -> dict:
    env = os.environ.get(OPTIONS_ENV)
    found: dict = {}
    if env:
        try:
            doc = json.loads(env)
            found = dict(doc.get(proto, {})) if isinstance(doc, dict) else {}
        except ValueError:
            found = {}
    found.update(_options.get(proto, {}))
    if proto in ("s3", "s3a") and os.environ.get("AWS_ENDPOINT_URL") and "endpoint_url" not in found:
        found["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]      # older botocore ignores the variable
    return found


def secret_values() -> list[str]:
    """The credential values this process holds (to keep them out of output)."""
    return [v for k in SECRET_ENV if len(v := os.environ.get(k, "")) >= 4]


def redact(text: str) -> str:
    for v in secret_values():
        text = text.replace(v, "***")
    return text


# ---- the filesystem of a path, and retries ----

def filesystem(path: str):
    """(fsspec filesystem, path inside it). Listings are never cached: other nodes write too."""
    import fsspec

    if not is_url(path):
        return fsspec.filesystem("file"), os.path.abspath(local(path))
    proto = protocol(path)
    try:
        fs = fsspec.filesystem(proto, use_listings_cache=False, **options_for(proto))
    except (ImportError, ValueError) as exc:
        extra = {"s3": "'winnow[s3]'", "s3a": "'winnow[s3]'", "gs": "'winnow[gcs]'", "gcs": "'winnow[gcs]'",
                 "az": "adlfs", "abfs": "adlfs"}.get(proto)
        hint = f"; install it with pip install {extra}" if extra else ""
        raise StorageError(f"{path}: cannot open {proto}:// ({exc}){hint}") from None
    return fs, fs._strip_protocol(path)


def transient(exc: BaseException) -> bool:
    """An error worth retrying: the store was unreachable or busy, not a wrong key or a denial."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)):
        return False
    names = {c.__name__ for c in type(exc).__mro__}
    if names & {"EndpointConnectionError", "ConnectionClosedError", "ConnectTimeoutError", "ReadTimeoutError",
                "ClientConnectorError", "ServerDisconnectedError", "ClientOSError", "ConnectionError",
                "ConnectionRefusedError", "ConnectionResetError", "TimeoutError", "FSTimeoutError",
                "ClientPayloadError", "IncompleteRead", "ProxyConnectionError"}:
        return True
    text = str(exc)
    return any(s in text for s in ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout",
                                   "Connection refused", "Cannot connect", "Could not connect",
                                   "Service Unavailable", "503", "502"))


def retry(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, retried with jittered exponential backoff while the store is
    unreachable, for up to ``WINNOW_STORAGE_RETRY_S`` seconds (default 300)."""
    budget = float(os.environ.get(RETRY_SECONDS_ENV, "300"))
    deadline = time.monotonic() + budget
    delay = 0.5
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - classified below
            if not transient(exc) or time.monotonic() + delay > deadline:
                raise
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 10.0)


# ---- reading ----

def exists(path: str) -> bool:
    if not is_url(path):
        return os.path.exists(local(path))
    fs, p = filesystem(path)
    return bool(retry(fs.exists, p))


def isfile(path: str) -> bool:
    if not is_url(path):
        return os.path.isfile(local(path))
    fs, p = filesystem(path)
    return bool(retry(fs.isfile, p))


def isdir(path: str) -> bool:
    """A local folder, or a prefix with at least one object under it (or the bucket itself)."""
    if not is_url(path):
        return os.path.isdir(local(path))
    fs, p = filesystem(path)
    return bool(retry(fs.isdir, p))


def listdir(path: str) -> list[str]:
    """The names directly under ``path`` (files and sub-folders), sorted; [] when there is none."""
    if not is_url(path):
        p = local(path)
        return sorted(os.listdir(p)) if os.path.isdir(p) else []
    fs, p = filesystem(path)
    try:
        found = retry(fs.ls, p, detail=False)
    except FileNotFoundError:
        return []
    prefix = p.rstrip("/") + "/"
    return sorted({f[len(prefix):].split("/", 1)[0] for f in found if f.startswith(prefix) and len(f) > len(prefix)})


def find(path: str, suffix: str = "") -> list[str]:
    """Every file under ``path`` (recursively) whose name ends in ``suffix``, as full paths or URLs, sorted."""
    if not is_url(path):
        root = local(path)
        out = []
        for d, dirs, names in os.walk(root):
            dirs.sort()
            out += [os.path.join(d, n) for n in names if n.endswith(suffix)]
        return sorted(out)
    fs, p = filesystem(path)
    try:
        found = retry(fs.find, p)
    except FileNotFoundError:
        return []
    prefix = p.rstrip("/") + "/"
    scheme = protocol(path)
    return sorted(f"{scheme}://{f}" for f in found if f.startswith(prefix) and f.endswith(suffix))


def files_in(path: str, suffix: str = "") -> list[str]:
    """The files (not folders) directly under ``path`` whose names end in ``suffix``, as full paths, sorted."""
    if not is_url(path):
        p = local(path)
        if not os.path.isdir(p):
            return []
        return [os.path.join(p, n) for n in sorted(os.listdir(p))
                if n.endswith(suffix) and os.path.isfile(os.path.join(p, n))]
    fs, p = filesystem(path)
    try:
        found = retry(fs.ls, p, detail=True)
    except FileNotFoundError:
        return []
    prefix = p.rstrip("/") + "/"
    scheme = protocol(path)
    return sorted(f"{scheme}://{e['name']}" for e in found
                  if e.get("type") == "file" and e["name"].startswith(prefix) and e["name"].endswith(suffix))


def stamp(path: str) -> str:
    """What changes when a file is rewritten: size and modification time (a store's ETag)."""
    if not is_url(path):
        st = os.stat(local(path))
        return f"{st.st_size}|{st.st_mtime_ns}"
    fs, p = filesystem(path)
    info = retry(fs.info, p)
    return f"{info.get('size')}|{info.get('ETag') or info.get('etag') or info.get('LastModified') or info.get('mtime')}"


def read_bytes(path: str, limit: int | None = None) -> bytes:
    """A whole file; ``limit``: refuse (ValueError) a bigger one."""
    if not is_url(path):
        with open(local(path), "rb") as fh:
            if limit is None:
                data = fh.read()
            else:       # the size first: read(limit + 1) would allocate limit + 1 bytes (inputs.read_bounded)
                size = os.fstat(fh.fileno()).st_size
                data = fh.read(min(size, limit) + 1)
                if size < len(data) <= limit:       # it grew since: read on, still bounded
                    data += fh.read(limit + 1 - len(data))
    else:
        fs, p = filesystem(path)     # one ranged GET, no HEAD first (a plain cat_file asks for the size)
        data = retry(_cat_head, fs, p, (1 << 62) if limit is None else limit + 1)
    if limit is not None and len(data) > limit:
        raise ValueError(f"{path}: more than {limit} bytes")
    return data


def _cat_head(fs, p: str, n: int) -> bytes:
    """The first ``n`` bytes of an object by one ranged GET; an empty object answers a range with
    "not satisfiable" (HTTP 416), so that error on an object of size 0 is its empty content."""
    try:
        return fs.cat_file(p, start=0, end=n)
    except OSError as exc:
        if "not satisfiable" in str(exc) or "InvalidRange" in str(exc):
            if int(fs.info(p).get("size") or 0) == 0:
                return b""
        raise


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def open_read(path: str, ranged: bool = False) -> IO[bytes]:
    """A seekable binary file object; close it (``with``). On a store, reads go ahead of the position
    (good for scanning a file); ``ranged``: each read is one range request of exactly what is asked
    (random access to samples inside shards)."""
    if not is_url(path):
        return open(local(path), "rb")
    fs, p = filesystem(path)
    if ranged:
        return _RetryingFile(retry(fs.open, p, "rb", cache_type="none"))
    return _RetryingFile(retry(fs.open, p, "rb"))


class _RetryingFile:
    """A store's file whose reads wait out an unreachable store (``retry``): each read goes back to
    the position it started from and asks again, so nothing is read twice or skipped."""

    def __init__(self, fh):
        self._fh = fh

    def _read_at(self, pos: int, n: int) -> bytes:
        self._fh.seek(pos)
        return self._fh.read(n)

    def read(self, n: int = -1) -> bytes:
        return retry(self._read_at, self._fh.tell(), n)

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._fh.close()

    def __iter__(self):
        return iter(self._fh)


def listing(path: str, suffix: str = "") -> list[dict]:
    """The files directly under ``path`` ending in ``suffix``: ``{"path", "bytes", "stamp"}`` each,
    sorted by path; ``stamp`` changes when a file is rewritten (mtime, or a store's ETag)."""
    if not is_url(path):
        out = []
        for f in files_in(path, suffix):
            st = os.stat(f)
            out.append({"path": f, "bytes": st.st_size, "stamp": str(st.st_mtime_ns)})
        return out
    fs, p = filesystem(path)
    try:
        found = retry(fs.ls, p, detail=True)
    except FileNotFoundError:
        return []
    prefix, scheme = p.rstrip("/") + "/", protocol(path)
    return sorted(({"path": f"{scheme}://{e['name']}", "bytes": int(e.get("size") or 0),
                    "stamp": str(e.get("ETag") or e.get("LastModified") or e.get("mtime") or "")}
                   for e in found if e.get("type") == "file" and e["name"].startswith(prefix)
                   and e["name"].endswith(suffix)), key=lambda e: e["path"])


def arrow_filesystem(path: str):
    """(pyarrow filesystem, path) for pyarrow's dataset and parquet readers."""
    import pyarrow.fs as pafs

    if not is_url(path):
        return pafs.LocalFileSystem(), os.path.abspath(local(path))
    fs, p = filesystem(path)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), p


# ---- writing ----

def makedirs(path: str) -> None:
    """A local folder (and its parents); nothing on a store, where folders are key prefixes."""
    if not is_url(path):
        os.makedirs(local(path), exist_ok=True)


def write_once(path: str, data: bytes | bytearray | memoryview | Iterable[bytes]) -> int:
    """Write ``data`` (bytes, or chunks streamed in order) so that ``path`` holds all of it or is
    untouched: locally a temporary name, fsync, rename; on a store one PUT, or a multipart upload
    completed only after the last chunk (aborted on any error). Returns the size."""
    chunks = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
    if not is_url(path):
        size = 0
        with local_target(path) as tmp, open(tmp, "wb") as fh:
            for chunk in chunks:
                size += fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        return size
    if isinstance(data, (bytes, bytearray, memoryview)):
        fs, p = filesystem(path)
        retry(fs.pipe_file, p, bytes(data))
        return len(data)
    # a stream cannot be replayed when the store drops the upload half way: spool it to this node's
    # scratch first, so that each attempt uploads the whole file again
    with scratch("winnow-spool-") as d:
        tmp = os.path.join(d, "spool")
        with open(tmp, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
        return upload(tmp, path)


def _discard(fh) -> None:
    """Abandon an unfinished upload: its parts are deleted, nothing appears under the key."""
    try:
        fh.discard()
    except Exception:  # noqa: BLE001 - the store may be gone; abort_uploads cleans up on the next run
        pass
    fh.closed = True


@contextlib.contextmanager
def local_target(path: str) -> Iterator[str]:
    """A local file name for a writer that wants one (parquet, matplotlib, PIL, torch.save),
    published to ``path`` when the block ends without an exception: locally a temporary name beside
    it, renamed; for a store a file in the node's scratch folder, uploaded, then removed. Give the
    writer the format explicitly: the temporary name ends in ``.tmp``."""
    if not is_url(path):
        p = local(path)
        tmp = f"{os.path.dirname(p)}/.{os.path.basename(p)}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            yield tmp
            os.replace(tmp, p)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    with scratch() as d:
        tmp = os.path.join(d, f"upload.{uuid.uuid4().hex[:8]}.tmp")
        yield tmp
        upload(tmp, path)


def upload(src: str, path: str) -> int:
    """Copy local file ``src`` to ``path`` under the commit rule (``write_once``): one PUT, or a
    multipart upload completed after its last part and aborted on any error; the whole upload is
    retried while the store is unreachable."""
    size = os.path.getsize(src)
    if not is_url(path):
        with local_target(path) as tmp:
            shutil.copyfile(src, tmp)
        return size
    if size <= PART_BYTES:
        with open(src, "rb") as fh:
            return write_once(path, fh.read())
    fs, p = filesystem(path)

    def attempt() -> int:
        out = fs.open(p, "wb", block_size=PART_BYTES)
        try:
            with open(src, "rb") as fh:
                while chunk := fh.read(PART_BYTES):
                    out.write(chunk)
            out.close()
        except BaseException:
            _discard(out)
            raise
        return size

    return retry(attempt)


def download(path: str, dest: str) -> str:
    """Copy ``path`` to local file ``dest`` (whole or not at all); returns ``dest``."""
    with open_read(path) as src:
        with local_target(dest) as tmp, open(tmp, "wb") as fh:
            shutil.copyfileobj(src, fh, 8 * 1024 ** 2)
    return dest


def _rel(path: str, root: str) -> str:
    return path[len(root.rstrip("/")) + 1:] if is_url(root) else os.path.relpath(path, local(root))


def fetch(path: str, dest: str, threads: int = 8) -> str:
    """Copy a file or a whole folder (every object under the prefix) to local ``dest``, each file
    whole or not at all, ``threads`` at a time; returns ``dest``. A missing source is FileNotFoundError."""
    if isfile(path):
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        return download(path, dest)
    files = find(path)
    if not files:
        raise FileNotFoundError(f"{path}: no such file or folder")
    targets = [(f, os.path.join(dest, *_rel(f, path).split("/"))) for f in files]
    for d in sorted({os.path.dirname(t) for _, t in targets}):
        os.makedirs(d, exist_ok=True)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, min(threads, len(targets)))) as pool:
        list(pool.map(lambda ft: download(*ft), targets))
    return dest


@contextlib.contextmanager
def local_copy(path: str) -> Iterator[str]:
    """A local path with ``path``'s content for a reader that needs one (diffusers, torch, PIL):
    the path itself when it is local; from a store, a copy of the file or folder in this node's
    scratch, removed when the block ends."""
    if not is_url(path):
        yield local(path)
        return
    with scratch("winnow-fetch-") as d:
        yield fetch(path, os.path.join(d, name(path) or "root"))


def copy_tree(src: str, dst: str, last: tuple[str, ...] = ()) -> int:
    """Copy every file under ``src`` to the same names under ``dst`` (either may be local or a URL;
    within one store a server-side copy), each whole; the files named in ``last`` (names relative
    to ``src``, e.g. a marker) go after all the others. Returns how many files."""
    files = find(src)
    files.sort(key=lambda f: _rel(f, src) in last)
    for f in files:
        copy(f, join(dst, *_rel(f, src).split("/")))
    return len(files)


def copy(src: str, dst: str) -> None:
    """Copy one file, whole or not at all (within one store a server-side copy)."""
    if is_url(src) and is_url(dst) and protocol(src) == protocol(dst):
        fs, a = filesystem(src)
        retry(fs.copy, a, filesystem(dst)[1])
        return
    makedirs(parent(dst))
    if is_url(src):
        download(src, dst)
    else:
        upload(local(src), dst)


def remove(path: str) -> None:
    """Delete one file (absent is fine)."""
    if not is_url(path):
        with contextlib.suppress(FileNotFoundError):
            os.remove(local(path))
        return
    fs, p = filesystem(path)
    with contextlib.suppress(FileNotFoundError):
        retry(fs.rm_file, p)


def remove_tree(path: str) -> int:
    """Delete a folder and everything under it (on a store, exactly the keys under ``path/``, never a
    sibling that shares the prefix); returns how many files went."""
    if not is_url(path):
        p = local(path)
        if os.path.isdir(p) and not os.path.islink(p):
            n = sum(len(f) for _, _, f in os.walk(p))
            shutil.rmtree(p)
            return n
        if os.path.lexists(p):
            os.remove(p)
            return 1
        return 0
    fs, p = filesystem(path)
    prefix = p.rstrip("/") + "/"
    try:
        keys = [k for k in retry(fs.find, p) if k.startswith(prefix)]
    except FileNotFoundError:
        keys = []
    if keys:
        retry(fs.rm, keys)
    abort_uploads(path)
    return len(keys)


def abort_uploads(path: str) -> int:
    """Abort multipart uploads left under ``path`` by a killed writer (S3); returns how many."""
    if protocol(path) not in ("s3", "s3a"):
        return 0
    fs, p = filesystem(path)
    bucket, _, prefix = p.partition("/")
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    try:
        listed = retry(fs.call_s3, "list_multipart_uploads", Bucket=bucket, Prefix=prefix)
    except Exception:  # noqa: BLE001 - a store that forbids listing uploads: nothing to clean here
        return 0
    n = 0
    for up in listed.get("Uploads") or []:
        if up.get("Key", "").startswith(prefix):
            with contextlib.suppress(Exception):
                retry(fs.call_s3, "abort_multipart_upload", Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
                n += 1
    return n


def walk(path: str) -> list[dict]:
    """Every file under ``path``: ``{"path", "rel" (its top-level name under path), "bytes"}``."""
    if not is_url(path):
        out = []
        for f in find(path):
            out.append({"path": f, "rel": os.path.relpath(f, local(path)).split(os.sep, 1)[0],
                        "bytes": os.path.getsize(f)})
        return out
    fs, p = filesystem(path)
    try:
        found = retry(fs.find, p, detail=True)
    except FileNotFoundError:
        return []
    prefix, scheme = p.rstrip("/") + "/", protocol(path)
    return [{"path": f"{scheme}://{k}", "rel": k[len(prefix):].split("/", 1)[0], "bytes": int(e.get("size") or 0)}
            for k, e in sorted(found.items()) if k.startswith(prefix)]


def measure_rates(folder: str, mb: int = 32) -> dict:
    """Write ``mb`` MB under ``folder`` (streamed, as shards are), read it back, delete it: MB/s each way."""
    chunk = os.urandom(1 << 20)
    path = join(folder, f"rate-probe-{uuid.uuid4().hex[:8]}")
    makedirs(folder)
    t = time.perf_counter()
    write_once(path, (chunk for _ in range(mb)))
    w = time.perf_counter() - t
    t = time.perf_counter()
    with open_read(path) as fh:
        while fh.read(8 << 20):
            pass
    r = time.perf_counter() - t
    remove(path)
    if not is_url(folder):
        with contextlib.suppress(OSError):
            os.rmdir(local(folder))
    return {"probe_mb": mb, "write_mb_s": round(mb / max(w, 1e-9), 1), "read_mb_s": round(mb / max(r, 1e-9), 1)}


# ---- node-local scratch ----

def scratch_root() -> str:
    """This node's scratch folder: ``WINNOW_SCRATCH``, or the system temporary folder."""
    root = os.environ.get(SCRATCH_ENV) or tempfile.gettempdir()
    os.makedirs(root, exist_ok=True)
    return root


@contextlib.contextmanager
def scratch(prefix: str = "winnow-") -> Iterator[str]:
    """A fresh folder in this node's scratch, removed when the block ends (whatever happens)."""
    d = tempfile.mkdtemp(prefix=prefix, dir=scratch_root())
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---- before a run: can the store be used? ----

def require_local(paths: dict, command: str) -> None:
    """Refuse, before any work, a URL where a command still needs a local path (``paths``: spec key
    -> path or None), naming the key and what to do instead."""
    from pipeline.contract.errors import ConfigError

    for key, path in paths.items():
        if isinstance(path, str) and is_url(path):
            raise ConfigError(f"{key} {path!r}: {command} reads and writes local paths only so far (curate, select, "
                              f"sweep, report and train take s3:// and gs:// URLs); copy it to a local folder, or "
                              f"give one")



WRITABLE_FOR_S = 60.0          # how long a passed check_writable holds in this process
_writable: dict = {}            # (location, options) -> when it passed check_writable
_checkers: dict = {}            # (protocol, options) -> the fail-fast filesystem check_writable uses


def _checker(proto: str):
    """An S3 filesystem that tries once with short timeouts (made once per options: building a
    client costs a few hundred milliseconds)."""
    import fsspec

    opts = options_for(proto)
    key = (proto, json.dumps(opts, sort_keys=True, default=str))
    if key not in _checkers:
        fs = fsspec.filesystem(proto, use_listings_cache=False, skip_instance_cache=True,
                               config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 5, "read_timeout": 20},
                               **opts)
        fs.retries = 1                    # s3fs's own retry loop, on this checking instance only
        _checkers[key] = fs
    return _checkers[key]


def check_writable(path: str, what: str) -> None:
    """Fail fast, in one line, when ``path`` on a store cannot be used: a missing bucket, an
    endpoint that does not answer, denied access, or a key that is a file. Local paths pass."""
    from pipeline.contract.errors import ConfigError

    if not is_url(path):
        return
    key = (absolute(path), json.dumps(options_for(protocol(path)), sort_keys=True, default=str))
    if time.monotonic() - _writable.get(key, -1e9) < WRITABLE_FOR_S:   # a plan, then the run: checked once
        return
    try:
        fs, p = filesystem(path)
        if protocol(path) in ("s3", "s3a"):   # a wrong endpoint fails now, not after minutes of retries
            fs = _checker(protocol(path))
    except StorageError as exc:
        raise ConfigError(f"{what} {path!r}: {exc}") from None
    bucket = p.split("/", 1)[0]
    try:
        try:
            if protocol(path) in ("s3", "s3a"):
                fs.call_s3("head_bucket", Bucket=bucket)
            else:
                fs.info(bucket)
        except FileNotFoundError:
            raise ConfigError(f"{what} {path!r}: bucket {bucket!r} does not exist (or is not visible with these "
                              f"credentials); create it, or check the name") from None
        if p != bucket and fs.isfile(p):
            raise ConfigError(f"{what} {path!r} is a file on the store, not a folder; choose a prefix")
        probe = f"{p.rstrip('/')}/.winnow/probe-{uuid.uuid4().hex[:8]}"
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
        _writable[key] = time.monotonic()
    except ConfigError:
        raise
    except PermissionError as exc:
        raise ConfigError(f"{what} {path!r}: access denied ({redact(str(exc)).splitlines()[0]}); check the "
                          f"credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile, Google ADC)") from None
    except Exception as exc:  # noqa: BLE001 - every other failure is a store we cannot reach
        msg = redact(str(exc)).splitlines()[0] if str(exc) else type(exc).__name__
        endpoint = options_for(protocol(path)).get("endpoint_url")
        raise ConfigError(f"{what} {path!r}: the store does not answer ({type(exc).__name__}: {msg})"
                          + (f"; check the endpoint {endpoint}" if endpoint else "")) from None


__all__ = [
    "StorageError",
    "abort_uploads",
    "absolute",
    "arrow_filesystem",
    "check_options",
    "check_writable",
    "configure",
    "copy",
    "copy_tree",
    "download",
    "fetch",
    "local_copy",
    "exists",
    "files_in",
    "filesystem",
    "find",
    "is_inside",
    "is_url",
    "isdir",
    "isfile",
    "join",
    "listdir",
    "listing",
    "local",
    "local_target",
    "measure_rates",
    "makedirs",
    "name",
    "open_read",
    "parent",
    "protocol",
    "read_bytes",
    "read_text",
    "redact",
    "remove",
    "remove_tree",
    "require_local",
    "retry",
    "scratch",
    "scratch_root",
    "secret_values",
    "stamp",
    "transient",
    "upload",
    "walk",
    "write_once",
]
