"""The stage protocol, its resources and the batch helpers every stage uses.

A stage is a small class: its constructor loads what it needs once (per Ray actor), its
``__call__`` takes a batch (dict of column -> numpy array) and returns it with columns added.
Stages never import Ray; ``pipeline.adapter`` maps them onto Ray Data.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np

from pipeline.contract.config import ConfigError
from pipeline.contract.schema import FRAMES, IMAGE, KEPT, REJECT_REASON, REJECTED, STATUS

Batch = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Resources:
    """What one copy of a stage needs; the adapter maps this onto Ray Data."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    batch_size: int = 64
    concurrency: int | None = None   # actor pool size; None = sized by the adapter


class Stage:
    """Base class of every stage.

    Subclasses set ``name`` (the registry name used in YAML), ``Config`` (a dataclass whose
    fields are the stage's YAML keys) and the resources they need. ``stateful`` stages hold a
    model and run as a Ray actor pool; the others run as plain Ray tasks.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type] = object
    num_cpus: ClassVar[float] = 1.0
    num_gpus: ClassVar[float] = 0.0
    batch_size: ClassVar[int] = 64
    stateful: ClassVar[bool] = False
    concurrency: ClassVar[int | None] = None   # actor pool size; None = sized by the adapter

    # False for stages whose work is all in ``reduce`` (no per-batch pass is scheduled for them).
    has_batch_work: ClassVar[bool] = True
    # Stage names that must come earlier in the spec (e.g. aesthetic reads clip's embedding);
    # "decode|clips" accepts either.
    after: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: Any):
        self.config = config

    @classmethod
    def resources(cls, config: Any, cluster_gpus: float = 0.0) -> Resources:
        """Resources per copy. Model stages override this to honour their ``device`` key."""
        return Resources(cls.num_cpus, cls.num_gpus, cls.batch_size, cls.concurrency)

    @classmethod
    def notices(cls, config: Any, earlier: list[tuple[str, Any]]) -> list[str]:
        """What a user must be told about this stage's setup, once, in the run's summary and report
        (a model on random weights, whose scores and filters mean nothing). ``earlier`` as in ``validate``."""
        return []

    @classmethod
    def validate(cls, config: Any, key: str, earlier: list[tuple[str, Any]]) -> None:
        """Check what a dataclass cannot (weights exist, a needed stage came earlier) before Ray
        starts; raise ``pipeline.contract.config.ConfigError`` naming ``key``. ``earlier`` holds the
        (name, config) of the stages before this one."""
        names = [n for n, _ in earlier]
        for need in cls.after:   # "a|b": either stage will do
            options = need.split("|")
            if not any(o in names for o in options):
                wanted = " or ".join(repr(o) for o in options)
                raise ConfigError(f"{key}: stage {cls.name!r} needs a {wanted} stage before it in stages")

    def __call__(self, batch: Batch) -> Batch:  # pragma: no cover - interface
        raise NotImplementedError

    # A stage that needs every row of the run (dedup) also implements ``reduce``: it gets the
    # annotated rows (``pipeline.shards.FragmentRows``: ``table(columns)`` or streamed
    # ``batches(columns)``, plus a ``scratch`` folder) and returns, per key to reject,
    # (reason, duplicate_of or None). It runs on the driver between annotate and write.
    def reduce(self, rows) -> dict[str, tuple[str, str | None]]:  # pragma: no cover
        return {}

    @classmethod
    def has_reduce_method(cls) -> bool:
        return cls.reduce is not Stage.reduce

    # A first stage that turns one input row into many (a video into clips) says so here; the
    # engine then asks it, not a module it imports, how to read, resume and count (``FanOut``).
    fan_out: ClassVar[type[FanOut] | None] = None


class FanOut:
    """What the engine must know of a stage that turns one input row into many rows.

    ``reader`` reads each input row in place of the engine's loader (one block per input);
    ``progress`` tells, from the written fragments' ``progress_columns``, which output rows exist
    and which inputs are complete (so a killed run redoes only unfinished inputs); ``split_rows``
    turns one shard's rows into (output rows, one row per input) and ``counts`` summarises the
    per-input table (``videos/NNNNN.parquet`` for clips).
    """

    reader: ClassVar[type[Stage]] = Stage
    reader_label: ClassVar[str] = "read"
    unit: ClassVar[str] = "row"                 # what the progress bar counts
    input_format: ClassVar[str] = ""            # the plan format it reads, e.g. "videos"
    progress_columns: ClassVar[list[str]] = []

    @staticmethod
    def with_input(config: Any, input_spec: Any) -> Any:
        """The stage's config with what it needs from the input section filled in."""
        return config

    @staticmethod
    def input_key(key: str) -> str:  # pragma: no cover - interface
        """The key of the input row an output row's ``key`` came from."""
        raise NotImplementedError

    @staticmethod
    def progress(table) -> tuple[set[str], set[str]]:  # pragma: no cover - interface
        raise NotImplementedError

    @staticmethod
    def split_rows(rows: list[dict]) -> tuple[list[dict], list[dict]]:  # pragma: no cover - interface
        raise NotImplementedError

    @staticmethod
    def counts(per_input) -> dict:  # pragma: no cover - interface
        raise NotImplementedError


# ---- helpers every stage uses ----

def batch_len(batch: Batch) -> int:
    for value in batch.values():
        return len(value)
    return 0


def rows_to_batch(rows: list[dict]) -> dict[str, np.ndarray]:
    """Rows -> a numpy batch. Columns that are None in every row are left out: Ray turns such a
    column into floats, which then cannot merge with the same column holding text elsewhere."""
    names: list[str] = []
    for r in rows:
        for k, v in r.items():
            if k not in names and v is not None:
                names.append(k)
    out = {}
    for k in names:
        arr = np.empty(len(rows), dtype=object)
        for i, r in enumerate(rows):
            arr[i] = r.get(k)
        out[k] = arr
    return out


def plain(v: Any) -> Any:
    """A batch value as a plain Python value; NaN (how Ray carries a null) becomes None."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and v != v:
        return None
    if isinstance(v, np.ndarray):
        return v.tolist() if v.dtype != object else list(v)
    return v


def batch_rows(batch: Batch) -> list[dict]:
    """A numpy batch -> rows of plain values."""
    n = batch_len(batch)
    return [{k: plain(v[i]) for k, v in batch.items()} for i in range(n)]


def _nan_to_none(values: np.ndarray) -> np.ndarray:
    out = values.astype(object)
    if values.dtype.kind == "f":
        out[np.isnan(values)] = None
    return out


def ensure_status(batch: Batch) -> Batch:
    """Add ``status``/``reject_reason`` columns if the batch has none yet.

    A column of nulls crosses Ray's Arrow <-> numpy conversion as float NaN; it comes back as
    an object column of None here.
    """
    n = batch_len(batch)
    if STATUS not in batch:
        batch[STATUS] = np.array([KEPT] * n, dtype=object)
    if REJECT_REASON not in batch:
        batch[REJECT_REASON] = np.array([None] * n, dtype=object)
    elif batch[REJECT_REASON].dtype != object:
        batch[REJECT_REASON] = _nan_to_none(batch[REJECT_REASON])
    return batch


def active(batch: Batch) -> np.ndarray:
    """Boolean mask of rows still kept (stages skip rows an earlier stage rejected)."""
    ensure_status(batch)
    return np.asarray([s == KEPT for s in batch[STATUS]], dtype=bool)


def reject(batch: Batch, index: int, reason: str) -> None:
    """Mark one row rejected; the first reason wins."""
    if batch[STATUS][index] == KEPT:
        batch[STATUS][index] = REJECTED
        batch[REJECT_REASON][index] = reason


def column(batch: Batch, name: str, default: Any = None) -> np.ndarray:
    """Return ``batch[name]`` as an object array, creating it filled with ``default``."""
    n = batch_len(batch)
    if name not in batch:
        batch[name] = np.array([default] * n, dtype=object)
    elif batch[name].dtype != object:
        batch[name] = _nan_to_none(batch[name])
    return batch[name]


def sample_images(batch: Batch, index: int) -> list[bytes]:
    """The encoded pictures a model scores for one row: a clip's frames, or the image itself."""
    if FRAMES in batch and batch[FRAMES][index] is not None and len(batch[FRAMES][index]):
        return list(batch[FRAMES][index])
    if IMAGE in batch and batch[IMAGE][index] is not None:
        return [batch[IMAGE][index]]
    return []


def is_clip_batch(batch: Batch) -> bool:
    return FRAMES in batch


def reason_category(reason: str | None) -> str:
    """The part of a reject reason before the colon ("too_short: 1.2 s < 2" -> "too_short")."""
    return (reason or "").split(":", 1)[0].strip() or "unknown"


def reason_counts(reasons) -> dict[str, int]:
    """Rejected rows per reason category, most frequent first."""
    counts: dict[str, int] = {}
    for r in reasons:
        cat = reason_category(r)
        counts[cat] = counts.get(cat, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def as_optional_float(value: Any) -> float | None:
    """None for missing/NaN/unparseable values, else a float."""
    if value is None:
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return None if f != f else f

