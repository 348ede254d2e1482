"""The input policy every loading stage applies: which local files and URLs may be opened (regular
files under a root, protocols named in the spec), reads bounded in bytes, file names that are not
UTF-8 kept exactly, caption bytes to text."""
from __future__ import annotations

import base64
import os
import stat
from dataclasses import dataclass, field

DOWNLOAD_PROTOCOLS = ("http", "https", "ftp", "ftps", "sftp", "ssh", "scp", "data", "blob")
_FS_TAG = "\x00fsb64:"            # a NUL never occurs in a real path: marks a name that is not UTF-8


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def encode_fs_path(path: str) -> str:
    """A path as Arrow-safe text: itself, or (a name that is not valid UTF-8, which Python holds with
    surrogate escapes) its exact bytes, tagged and base64-encoded. ``fs_path`` reverses it."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return _FS_TAG + base64.b64encode(os.fsencode(path)).decode("ascii")


def fs_path(text: str) -> str:
    """The path to open for a plan's path text (see ``encode_fs_path``)."""
    if text.startswith(_FS_TAG):
        return os.fsdecode(base64.b64decode(text[len(_FS_TAG):]))
    return text


def display_name(path: str) -> str:
    """A path for people and tables: bytes that are not UTF-8 shown as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


@dataclass
class InputPolicy:
    """What a loading stage may open: local files under ``root`` (unless ``allow_outside``), regular
    files only, at most ``max_file_bytes`` read into memory. ``root`` None: no local check (tar shards
    named by the spec itself)."""
    root: str | None = None
    allow_outside: bool = False
    max_file_bytes: int = 256 * 1024 ** 2
    storage_options: dict = field(default_factory=dict)


class InputRejected(Exception):
    """An input the policy refuses; the message is the reject reason."""


_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder"}


def is_inside(child: str, parent: str) -> bool:
    """Whether path ``child`` is ``parent`` or lies under it (both already normalised)."""
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def check_local(text: str, policy: InputPolicy) -> str:
    """The real path of a local input the policy allows, after checking it is a regular file under the
    root; raises InputRejected (or FileNotFoundError)."""
    path = os.path.realpath(fs_path(text[len("file://"):] if text.startswith("file://") else text))
    if policy.root and not policy.allow_outside and not is_inside(path, policy.root):
        raise InputRejected(f"outside_base: {display_name(path)} is outside {display_name(policy.root)} "
                            f"(set input.allow_outside_base: true to read it)")
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise InputRejected(f"not_a_regular_file: {_KINDS.get(stat.S_IFMT(mode), 'not a file')}")
    return path


def read_bounded(fh, limit: int, expect: int | None = None) -> bytes:
    """All of an open file, refused when it holds more than ``limit`` bytes (at most limit + 1 are read).

    ``expect``: the size ``fstat`` gave. Reading that (+ 1) first spares asking for ``limit`` + 1
    bytes at once, which makes Python allocate all of them (256 MB by default) and shrink the
    result again: 4-6x the time of the read itself on camera JPEGs. A file that grew since is read
    on, still bounded."""
    if expect is not None and expect < limit:
        data = fh.read(expect + 1)
        if len(data) <= expect:
            return data
        data += fh.read(limit - len(data) + 1)
    else:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise InputRejected(f"too_large: more than input.max_file_bytes {limit} bytes")
    return data


def read_local(text: str, policy: InputPolicy) -> bytes:
    """A whole local file the policy allows, bounded by ``max_file_bytes``.

    Opened non-blocking and checked on the open descriptor, so a FIFO or device swapped in after
    the check cannot hang or flood the reader."""
    path = check_local(text, policy)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputRejected(f"not_a_regular_file: {_KINDS.get(stat.S_IFMT(st.st_mode), 'not a file')}")
        if st.st_size > policy.max_file_bytes:
            raise InputRejected(f"too_large: {st.st_size} bytes > input.max_file_bytes {policy.max_file_bytes}")
        return read_bounded(fh, policy.max_file_bytes, st.st_size)


def read_file(text: str, policy: InputPolicy) -> bytes:
    """A whole file the policy allows, bounded by ``max_file_bytes``: a local one as ``read_local``
    reads it, an object on a store in one ranged GET."""
    if not is_remote(text):
        return read_local(text, policy)
    from pipeline.contract import storage

    try:
        return storage.read_bytes(text, limit=policy.max_file_bytes)
    except ValueError:
        raise InputRejected(f"too_large: more than input.max_file_bytes {policy.max_file_bytes} bytes") from None


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


__all__ = ["DOWNLOAD_PROTOCOLS", "InputPolicy", "InputRejected", "check_local", "decode_text", "display_name",
           "encode_fs_path", "fs_path", "is_inside", "is_remote", "read_bounded", "read_file", "read_local"]
