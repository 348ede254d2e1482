"""The one tar reader and writer for WebDataset shards: webdataset's key rule, header scans,
sample grouping that accounts for every member, and safe member names.

Key rule (webdataset's ``base_plus_ext``): a member's key is its path up to the first dot of its
file name, its extension everything after; names without a dot, or whose file name starts with a
dot, belong to no sample. ``group`` turns a tar's members into samples and *strays*: an image
member that is not its sample's one image (a repeated name, ``x.JPG`` beside ``x.jpg``, two images
under one key such as ``a.b.jpg`` and ``a.c.jpg``) is a stray with its reason, so a reader can make
it a rejected row instead of dropping it.
"""
from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

# members that hold a sample's picture (images Pillow reads; mp4 for clips)
MEDIA_EXTS = ("jpg", "jpeg", "png", "webp", "mp4")


def split_name(name: str) -> tuple[str, str] | None:
    """(key, extension) by webdataset's rule, or None for a name that is not a sample member."""
    folder, _, base = name.rpartition("/")
    if not base or base.startswith(".") or "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return (f"{folder}/{stem}" if folder else stem), ext


def unsafe_name(name: str) -> str | None:
    """Why ``name`` may not be written as a member of a winnow shard (None: it may)."""
    if not name:
        return "empty"
    if "/" in name or "\\" in name:
        return "holds a path separator"
    if ".." in name:
        return "holds '..'"
    if "\0" in name or any(ord(c) < 32 for c in name):
        return "holds a control character"
    return None


@dataclass
class Member:
    name: str
    header: int      # offset of its first header block (extended headers included)
    data: int        # offset of its data
    size: int

    @property
    def end(self) -> int:
        return self.data + self.size + (-self.size % 512)

    @property
    def key(self) -> str | None:
        parts = split_name(self.name)
        return parts[0] if parts else None

    @property
    def ext(self) -> str:
        parts = split_name(self.name)
        return parts[1] if parts else ""


def _octal(field_: bytes) -> int:
    if field_[:1] and field_[0] & 0x80:          # base-256 (GNU) sizes: let tarfile handle the archive
        raise ValueError("base-256 number")
    return int(field_.rstrip(b"\0 ").strip() or b"0", 8)


def scan(fh: BinaryIO) -> Iterator[Member]:
    """The regular-file members of a tar, from the headers alone (data is seeked over). Plain USTAR
    headers (what winnow and img2dataset write) are parsed directly; any other kind of archive (PAX,
    GNU long names, base-256 sizes) is handed to ``tarfile`` from the start, whose members then
    start at their real header."""
    found: list[Member] = []          # yielded only once the whole scan succeeded: a fallback restarts
    pos = 0
    while True:
        fh.seek(pos)
        h = fh.read(512)
        if len(h) < 512 or h == b"\0" * 512:
            break
        try:
            if h[156:157] not in (b"0", b"\0", b"5") or h[257:262] != b"ustar":
                raise ValueError("not a plain ustar member")
            if _octal(h[148:156]) != sum(h[:148]) + 256 + sum(h[156:]):
                raise ValueError("bad header checksum")
            size = _octal(h[124:136])
        except ValueError:
            fh.seek(0)
            yield from _scan_tarfile(fh)
            return
        name = h[:100].rstrip(b"\0").decode("utf-8", "surrogateescape")
        prefix = h[345:500].rstrip(b"\0")
        if prefix:
            name = prefix.decode("utf-8", "surrogateescape") + "/" + name
        if h[156:157] != b"5":
            found.append(Member(name, pos, pos + 512, size))
        pos += 512 + size + (-size % 512)
    yield from found


def _scan_tarfile(fh: BinaryIO) -> Iterator[Member]:
    with tarfile.open(fileobj=fh, mode="r:") as tf:
        for m in tf:
            if m.isfile():
                yield Member(m.name, m.offset, m.offset_data, m.size)


def stream(fh: BinaryIO, want, max_bytes: int) -> Iterator[tuple[str, bytes | None, str | None]]:
    """One pass over a tar read as a stream (nothing seeked: an object on a store is read once):
    ``(name, data, None)`` for each regular member whose name ``want`` accepts and whose size fits
    ``max_bytes``, ``(name, None, reason)`` for one refused (``not_a_regular_file``, ``too_large``).
    Nothing is extracted to disk."""
    with tarfile.open(fileobj=fh, mode="r|") as tf:
        for m in tf:
            if not want(m.name):
                continue
            if not m.isreg():
                yield m.name, None, "not_a_regular_file"
            elif m.size > max_bytes:
                yield m.name, None, "too_large"
            else:
                yield m.name, tf.extractfile(m).read(), None


@dataclass
class Sample:
    key: str
    members: dict[str, Member] = field(default_factory=dict)   # lower-case extension -> member
    media: Member | None = None                                 # its one image or clip, if any

    @property
    def media_ext(self) -> str | None:
        return self.media.ext.rsplit(".", 1)[-1].lower() if self.media else None


@dataclass
class Stray:
    member: Member
    reason: str


def _is_media(ext: str, media_exts: tuple[str, ...]) -> bool:
    return ext.rsplit(".", 1)[-1].lower() in media_exts


def group(members: list[Member], media_exts: tuple[str, ...] = MEDIA_EXTS) -> list[Sample | Stray]:
    """Samples (in the order their keys first appear) and strays (after their sample). Every media
    member ends as a sample's media or as a stray: ``duplicate_member`` for a name seen before
    (case-insensitively), ``ambiguous_key`` for two different media names under one key."""
    samples: dict[str, Sample] = {}
    order: list[Sample | Stray] = []
    for m in members:
        parts = split_name(m.name)
        if parts is None:
            if _is_media(m.name.rpartition(".")[2], media_exts) and "." in m.name.rpartition("/")[2]:
                order.append(Stray(m, f"ambiguous_key: {m.name!r} has no sample key (its file name starts with a dot)"))
            continue
        key, ext = parts
        sample = samples.get(key)
        if sample is None:
            sample = samples[key] = Sample(key)
            order.append(sample)
        low = ext.lower()
        if low in sample.members:
            if _is_media(low, media_exts):
                order.append(Stray(m, f"duplicate_member: {m.name!r} repeats {sample.members[low].name!r}"))
            continue
        sample.members[low] = m
    out: list[Sample | Stray] = []
    for item in order:
        if isinstance(item, Sample):
            media = [m for e, m in item.members.items() if _is_media(e, media_exts)]
            if len(media) == 1:
                item.media = media[0]
            elif len(media) > 1:
                names = " and ".join(repr(m.name) for m in media)
                for m in media:
                    out.append(Stray(m, f"ambiguous_key: {names} share the key {item.key!r} (webdataset's key: the "
                                        f"name up to the first dot)"))
                item.members = {e: m for e, m in item.members.items() if not _is_media(e, media_exts)}
        out.append(item)
    return out


# ---- writing ----

def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0          # byte-identical shards across re-runs
    info.mode = 0o644
    return info


def block(name: str, data: bytes) -> bytes:
    """One regular-file member as tar bytes (USTAR header, data, padding). Refuses a name that
    could escape the folder a tar is extracted into."""
    why = unsafe_name(name)
    if why:
        raise ValueError(f"refusing to write tar member {name!r}: it {why}")
    info = _info(name, len(data))
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape") + data + b"\0" * (-len(data) % 512)


def end(size: int) -> bytes:
    """The end-of-archive blocks after ``size`` bytes of members, padded to a whole record (as tarfile does)."""
    total = size + 1024
    return b"\0" * (1024 + (-total % tarfile.RECORDSIZE))


__all__ = ["MEDIA_EXTS", "Member", "Sample", "Stray", "block", "end", "group", "scan", "split_name", "unsafe_name"]
