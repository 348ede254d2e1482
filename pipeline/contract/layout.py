"""The run folder: file names, claiming an output (ownership, overwrite), atomic writes, selection
manifests and the dataset card. Every command and stage writes through these."""
from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
from dataclasses import dataclass
from typing import ClassVar

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.contract import storage
from pipeline.contract.storage import join
from pipeline.contract.storage import local_target as atomic_path
from pipeline.contract.storage import write_once as atomic_write

# a run folder (curate and select write these; sweeps and training read them). Each row is on disk
# once, so a glob over the folder (DuckDB's 'OUT/**/*.parquet') counts it once: the annotation table
# is the per-shard tables together (``read_annotations``), a video run's table of videos the files of
# videos/ (``read_videos``).
SHARDS_DIR = "shards"               # NNNNN.tar (WebDataset), NNNNN.parquet (every row), NNNNN_stats.json (done marker)
ANNOTATIONS_FILE = "annotations.parquet"   # runs of winnow before the split: the annotation table as one file
VIDEOS_FILE = "videos.parquet"      # a selection's source videos (one file); earlier video runs' table of videos
VIDEO_ROWS_DIR = "videos"           # video runs: one row per input video, per shard (OUTPUT/videos/NNNNN.parquet)
EMBEDDINGS_DIR = "embeddings"       # NNNNN.parquet: keyed CLIP embeddings of a shard
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"
CARD_FILE = "README.md"             # the Hugging Face dataset card
WORK_DIR = "_work"                  # curate's fragments and reduction scratch; deleted at the end

OWNER_DIR = ".winnow"              # winnow's own files in any output folder (hidden from HF datasets, globs)
OWNER_FILE = f"{OWNER_DIR}/owner.json"


@dataclass(frozen=True)
class TrainRun:
    """A training run's folder (``winnow train``'s output.path, local or a URL): the name of
    everything it writes. ``ENTRIES`` is what ``output.overwrite`` may delete, and nothing else."""

    root: str

    SPEC: ClassVar[str] = "train_spec.yaml"          # the resolved spec; its fingerprint claims the folder
    RAY: ClassVar[str] = "ray"                       # Ray Train's storage: ray/train/checkpoint_NNNNNNN
    RAY_RUN: ClassVar[str] = "train"
    FINAL: ClassVar[str] = "final"                   # the exported diffusers pipeline
    LORA: ClassVar[str] = "lora"                     # a LoRA run's adapter (diffusers' format)
    BASE: ClassVar[str] = "base"                     # the tiny preset a LoRA applies to, written once
    SAMPLES: ClassVar[str] = "samples"               # step_NNNNNNN/ images or GIFs
    TENSORBOARD: ClassVar[str] = "tensorboard"
    METRICS: ClassVar[str] = "metrics.jsonl"         # one JSON line per logged step
    SUMMARY: ClassVar[str] = SUMMARY_FILE            # written last: the run finished
    INDEX: ClassVar[str] = "index.parquet"           # where each kept sample's bytes are in the shards
    INDEX_WORK: ClassVar[str] = "_index"
    VAL_INDEX: ClassVar[str] = "val_index.parquet"   # the held-out samples validation scores
    CACHE: ClassVar[str] = "cache"                   # cache/<fingerprint>/: precomputed latents
    MOTION: ClassVar[str] = "motion_buckets.json"    # svd: motion_score -> motion_bucket_id, fitted on the clips
    EVAL: ClassVar[str] = "eval"
    ENTRIES: ClassVar[tuple[str, ...]] = (SPEC, RAY, FINAL, FINAL + ".tmp", SAMPLES, TENSORBOARD, METRICS, SUMMARY,
                                          INDEX, INDEX_WORK, CACHE, MOTION, LORA, LORA + ".tmp", BASE, BASE + ".tmp",
                                          EVAL, VAL_INDEX)

    spec = property(lambda self: join(self.root, self.SPEC))
    final = property(lambda self: join(self.root, self.FINAL))
    lora = property(lambda self: join(self.root, self.LORA))
    base = property(lambda self: join(self.root, self.BASE))
    samples = property(lambda self: join(self.root, self.SAMPLES))
    tensorboard = property(lambda self: join(self.root, self.TENSORBOARD))
    metrics = property(lambda self: join(self.root, self.METRICS))
    summary = property(lambda self: join(self.root, self.SUMMARY))
    index = property(lambda self: join(self.root, self.INDEX))
    index_work = property(lambda self: join(self.root, self.INDEX_WORK))
    val_index = property(lambda self: join(self.root, self.VAL_INDEX))
    cache = property(lambda self: join(self.root, self.CACHE))
    motion = property(lambda self: join(self.root, self.MOTION))
    eval = property(lambda self: join(self.root, self.EVAL))
    ray = property(lambda self: join(self.root, self.RAY))

    @property
    def checkpoints(self) -> str:
        """The folder Ray Train keeps this run's ``checkpoint_NNNNNNN`` folders in."""
        return join(self.root, self.RAY, self.RAY_RUN)


@dataclass(frozen=True)
class CurriculumRun:
    """``winnow curriculum``'s output: one training run per stage, the pipelines each stage starts
    from, and the last stage's pipeline as ``final/``."""

    root: str

    SPEC: ClassVar[str] = "curriculum_spec.yaml"
    STAGES: ClassVar[str] = "stages"                 # stages/NN_name: a training run folder (TrainRun)
    INIT: ClassVar[str] = "init"                     # init/NN_fingerprint: the pipeline stage NN starts from
    FINAL: ClassVar[str] = "final"
    OPTIMIZER_STATE: ClassVar[str] = "optimizer_state"   # in an init folder: the stage before's AdamW moments
    ENTRIES: ClassVar[tuple[str, ...]] = (SPEC, STAGES, INIT, FINAL, FINAL + ".tmp")

    @property
    def spec(self) -> str:
        return join(self.root, self.SPEC)

    @property
    def final(self) -> str:
        return join(self.root, self.FINAL)

    def stage(self, index: int, name: str) -> TrainRun:
        return TrainRun(join(self.root, self.STAGES, f"{index + 1:02d}_{name}"))

    def init(self, index: int, fingerprint: str) -> str:
        return join(self.root, self.INIT, f"{index + 1:02d}_{fingerprint}")


def annotation_files(path: str) -> list[str]:
    """The files of an annotation table: ``path`` itself when it is a file, else the run folder's
    ``shards/NNNNN.parquet`` (every input row of each shard, kept and rejected), or the single
    ``annotations.parquet`` of a run written before the split; [] when there is none."""
    if storage.isfile(path):
        return [path]
    files = _numbered(join(path, SHARDS_DIR))
    if files:
        return files
    legacy = join(path, ANNOTATIONS_FILE)
    return [legacy] if storage.isfile(legacy) else []


def _numbered(folder: str) -> list[str]:
    """``folder``'s ``NNNNN.parquet`` files (a shard's table, not its ``_stats.json`` or a temporary)."""
    return [f for f in storage.files_in(folder, ".parquet") if fnmatch.fnmatch(storage.name(f), "[0-9]*.parquet")]


def read_schema(path: str) -> pa.Schema:
    """The schema of one parquet file, local or on a store."""
    with storage.open_read(path) as fh:
        return pq.read_schema(fh)


def read_table(path: str, columns: list[str] | None = None, present: bool = False) -> pa.Table:
    """One parquet file, local or on a store (one GET: winnow's parquet files are read whole).
    ``present``: read those of ``columns`` the file has (no error for the others)."""
    source = storage.local(path) if not storage.is_url(path) else pa.BufferReader(storage.read_bytes(path))
    if present and columns is not None:
        f = pq.ParquetFile(source)
        names = f.schema_arrow.names
        return f.read(columns=[c for c in columns if c in names])
    return pq.read_table(source, columns=columns)


def annotation_columns(path: str) -> list[str]:
    """Every column of the annotation table at ``path`` (the union over its files, in first-seen order)."""
    names: dict[str, None] = {}
    for f in annotation_files(path):
        names.update(dict.fromkeys(read_schema(f).names))
    return list(names)


def _read_parts(files: list[str], columns: list[str] | None) -> pa.Table:
    """The files as one table (their schemas unified: a column one shard lacks is null there), read
    in parallel by Arrow's dataset scanner, sorted by key."""
    import pyarrow.dataset as pads

    schema = pa.unify_schemas([read_schema(f) for f in files], promote_options="permissive")
    wanted = None if columns is None else [c for c in columns if c in schema.names]
    fs, _ = storage.arrow_filesystem(files[0])
    paths = [storage.arrow_filesystem(f)[1] for f in files]
    table = pads.dataset(paths, schema=schema, format="parquet", filesystem=fs).to_table(columns=wanted)
    return table.sort_by("key") if "key" in table.column_names else table


def read_annotations(path: str, columns: list[str] | None = None) -> pa.Table:
    """A run's annotation table, one row per input (kept and rejected), sorted by key: from a run
    folder (its per-shard tables) or one parquet file. ``columns`` that a table lacks are left out."""
    files = annotation_files(path)
    if not files:
        raise FileNotFoundError(f"{path}: no annotation table (shards/NNNNN.parquet); give a finished `winnow curate` "
                                f"or `winnow select` output folder")
    return _read_parts(files, columns)


def read_videos(run: str) -> pa.Table | None:
    """A video run's table of videos (one row per input video), or None for a run without videos."""
    files = _numbered(join(run, VIDEO_ROWS_DIR))
    if not files and storage.isfile(join(run, VIDEOS_FILE)):
        files = [join(run, VIDEOS_FILE)]
    return _read_parts(files, None) if files else None


def check_separate(out: str, inputs: dict[str, str]) -> None:
    """Refuse an output folder that is an input, lies inside one, or holds one (``inputs``: key -> path).

    A local path and a URL never overlap; two URLs overlap by their keys."""
    from pipeline.contract.config import ConfigError

    for key, path in inputs.items():
        if not path or storage.is_url(str(path)) != storage.is_url(out):
            continue
        if storage.is_inside(out, path) and storage.is_inside(path, out):
            raise ConfigError(f"output.path {out!r} is the same folder as {key} {path!r}; write to a new folder")
        if storage.is_inside(out, path):
            raise ConfigError(f"output.path {out!r} lies inside {key} {path!r}; write outside the input, or the next "
                              f"run would read its own output")
        if storage.is_inside(path, out):
            raise ConfigError(f"{key} {path!r} lies inside output.path {out!r}; choose an output folder that does not "
                              f"hold the input (overwrite would delete it)")


def read_owner(out: str) -> dict | None:
    """The ownership record of a winnow output folder, or None (not winnow's, or unreadable)."""
    try:
        doc = json.loads(storage.read_bytes(join(out, OWNER_FILE), limit=1 << 20))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("entries"), list):
        return None
    return doc


def _owned(name: str, entries: list[str]) -> bool:
    """A top-level name winnow writes (or a temporary file of one, left by a kill mid-write)."""
    if name in entries or name == OWNER_DIR:
        return True
    return name.startswith(".") and name.endswith(".tmp") and any(name.startswith(f".{e}.") for e in entries)


def foreign_entries(out: str, entries: list[str]) -> list[str]:
    """Top-level names in ``out`` that winnow did not write."""
    return sorted(n for n in storage.listdir(out) if not _owned(n, entries))


def clear_owned(out: str, noun: str) -> None:
    """Delete what a winnow command wrote in ``out`` (its ownership record lists it); refuse, listing
    them, when the folder holds anything else. The folder itself stays."""
    from pipeline.contract.config import ConfigError

    owner = read_owner(out)
    if owner is None:
        raise ConfigError(f"output.path {out!r} has no {OWNER_FILE}, so winnow cannot tell which files it wrote; "
                          f"delete the folder yourself or choose a new output.path")
    entries = [e for e in owner["entries"] if isinstance(e, str) and e and "/" not in e and os.sep not in e
               and e not in (".", "..")]
    foreign = foreign_entries(out, entries)
    if foreign:
        shown = ", ".join(repr(n) for n in foreign[:10]) + (
            f" and {len(foreign) - 10} more" if len(foreign) > 10 else ""
        )
        raise ConfigError(f"output.path {out!r} holds files winnow did not write ({shown}); overwrite deletes only a "
                          f"{noun}'s own files, so move those away or choose a new output.path")
    for name in storage.listdir(out):
        if name == OWNER_DIR or not _owned(name, entries):
            continue
        storage.remove_tree(join(out, name))
    storage.abort_uploads(out)     # parts of uploads a killed run left behind


def claim_output(out: str, marker: str, fingerprint: str, doc: dict, overwrite: bool, noun: str, changed: str,
                 entries: list[str], command: str, inputs: dict[str, str] | None = None, fresh: bool = False) -> None:
    """Create output folder ``out``, or check that its ``marker`` (a YAML spec with a fingerprint)
    records this same spec, so re-running resumes; then record ownership and write the marker.

    ``entries`` are the top-level names the command may write; ``.winnow/owner.json`` records them,
    and ``overwrite`` (or ``fresh``: a command that redoes its outputs on every run) deletes only
    those. A different spec fails unless ``overwrite``; a non-empty folder winnow does not own fails.
    ``inputs`` (key -> path) must not overlap the output."""
    import yaml

    from pipeline.contract.config import ConfigError

    check_separate(out, inputs or {})
    storage.check_writable(out, "output.path")
    if storage.isfile(out):
        raise ConfigError(f"output.path {out!r} exists and is not a folder")
    previous = None
    try:
        loaded = yaml.safe_load(storage.read_bytes(marker, limit=16 << 20).decode("utf-8"))
        previous = loaded.get("fingerprint") if isinstance(loaded, dict) else None
    except (OSError, ValueError, UnicodeDecodeError, yaml.YAMLError):
        previous = None
    existing = storage.listdir(out)
    owner = read_owner(out) if existing else None
    if previous is not None and previous == fingerprint and owner is not None and not fresh:
        pass                                                     # resume
    elif previous is not None and previous == fingerprint and owner is None:
        foreign = foreign_entries(out, entries)                  # a run from before ownership records
        if foreign:
            raise ConfigError(f"output.path {out!r} holds a {noun} and files winnow did not write "
                              f"({', '.join(map(repr, foreign[:10]))}); move those away to resume")
    elif [n for n in existing if n != OWNER_DIR]:
        if owner is None:
            if previous is not None:
                raise ConfigError(f"output.path {out!r} holds a {noun} made by a different spec ({changed} changed), "
                                  f"and no {OWNER_FILE} says which files are winnow's; choose a new output.path")
            raise ConfigError(f"output.path {out!r} exists and is not a winnow {noun}; choose an empty or new folder")
        if not (overwrite or (fresh and previous == fingerprint)):
            raise ConfigError(f"output.path {out!r} holds a {noun} made by a different spec ({changed} changed); "
                              f"choose a new output.path, or set output.overwrite=true to delete what that run wrote")
        clear_owned(out, noun)
    storage.makedirs(join(out, OWNER_DIR))
    atomic_write(join(out, OWNER_FILE),
                 json.dumps({"command": command, "entries": sorted(set(entries) | {storage.name(marker)})},
                            indent=2).encode())
    atomic_write(marker, yaml.safe_dump({"fingerprint": fingerprint, **doc}, sort_keys=False).encode())


def write_dataset_card(out: str, command: str, summary: dict) -> None:
    """``OUTPUT/README.md`` (and ``shards/README.md``): a Hugging Face dataset card whose ``configs``
    point at the tar shards, so ``datasets.load_dataset(OUTPUT)`` loads images (or clips), captions
    and annotation rows, and never takes winnow's other files for splits or rows."""
    reasons = summary.get("reasons") or {}
    head = ('---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n'
            '    path: "{path}"\ntags:\n- winnow\n---\n')
    body = (f"# winnow {command} output\n\n"
            f"{summary.get('kept', 0)} samples kept of {summary.get('inputs', 0)} inputs"
            + (f" (rejected: {', '.join(f'{k} {v}' for k, v in reasons.items())})" if reasons else "") + ".\n\n"
            "- `shards/NNNNN.tar`: WebDataset shards in img2dataset's layout: `KEY.jpg` (or `.png`, `.webp`, "
            "`.mp4` for clips), `KEY.txt` (caption), `KEY.json` (the sample's annotation row).\n"
            "- `shards/NNNNN.parquet`: the annotation table, one row per input (kept and rejected) with "
            "`status`, `reject_reason` and every score, split by shard; read it whole with "
            "`pyarrow.parquet.read_table(\"shards\")` or DuckDB's `'shards/*.parquet'`. Every row is on disk once, "
            "so `'**/*.parquet'` over the folder counts each input once (plus `embeddings/`, keyed CLIP embeddings, "
            "and `videos/`, one row per input video, where the run has them).\n"
            "- `summary.json`, `report.html`: counts and the run's report.\n\n"
            "```python\nfrom datasets import load_dataset\nds = load_dataset(\"PATH_TO_THIS_FOLDER\")   "
            "# columns jpg, txt, json, __key__\n```\n")
    cards = {join(out, CARD_FILE): head.format(path="shards/*.tar") + body}
    if storage.isdir(join(out, SHARDS_DIR)):
        cards[join(out, SHARDS_DIR, CARD_FILE)] = head.format(path="*.tar") + body
    for path, text in cards.items():
        try:
            if storage.read_bytes(path, limit=1 << 20).decode("utf-8") == text:
                continue                      # a re-run of a finished output changes nothing
        except (OSError, ValueError, UnicodeDecodeError):
            pass
        atomic_write(path, text.encode("utf-8"))


MANIFEST_RUNS = "winnow_runs"   # a selection manifest's metadata: the run folders its ``run`` column indexes


def fingerprint(doc) -> str:
    """16 hex digits of the SHA-256 of ``doc`` as sorted JSON: what identifies a spec or a shard set."""
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def manifest_runs(path: str) -> list[str]:
    """The run folders a selection manifest (``winnow sweep``'s selections/cell_NNN.parquet) was made from."""
    meta = read_schema(path).metadata or {}
    return json.loads(meta.get(MANIFEST_RUNS.encode(), b"[]"))


def table_bytes(table: pa.Table, compression: str = "zstd") -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression=compression)
    return sink.getvalue()


__all__ = ["MANIFEST_RUNS", "OWNER_DIR", "OWNER_FILE", "VIDEO_ROWS_DIR", "atomic_path", "atomic_write",
           "check_separate", "claim_output", "clear_owned", "fingerprint", "foreign_entries", "join", "manifest_runs",
           "read_owner", "read_schema", "read_table",
           "table_bytes", "write_dataset_card"]
