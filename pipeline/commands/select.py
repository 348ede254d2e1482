"""Materialise a selection: ``winnow select`` writes a new shard set holding only the chosen
samples of one or more curated runs, copied from their shards (no re-decoding, no model).

The selection is a manifest of keys (``winnow sweep``'s ``selections/cell_NNN.parquet``) or
thresholds given inline (the sweep's levels, ANDed). The plan is fixed before Ray starts: the
selected rows sorted by (run, source shard, key) and cut into output shards of
``samples_per_shard``. Each output shard is one Ray task that reads its samples' members from
the source tars by byte range and writes ``PPPPP.tar``, ``PPPPP.parquet`` (the samples'
annotation rows) and ``PPPPP_stats.json`` last, each atomically; a re-run after a kill skips the
shards whose stats exist, so the result equals an uninterrupted run, with no sample twice and none
lost. The output is a run folder like ``winnow curate``'s (shards/ with their annotation tables,
embeddings/, summary.json, report.html), so training, sweeps and reports read it the same way.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import adapter, shards
from pipeline.commands.sweep import FilterSpec, check_filters, derive_text, levels_for, source_column, values
from pipeline.contract import layout, storage
from pipeline.contract import tar as tars
from pipeline.contract.config import (
    ConfigError,
    RaySettings,
    apply_overrides,
    build,
    load_yaml,
    option,
    take_kind,
    to_dict,
)
from pipeline.contract.schema import KEPT, KEY, PARTITION, STATUS, VIDEO_KEY
from pipeline.contract.storage import join

NAME = "select"
DESCRIPTION = """\
Materialise a selection into a new shard set, copied from the source runs' shards.

  winnow select SPEC.yaml [--set dotted.key=value ...]
  winnow select --selection SWEEP/selections/cell_NNN.parquet --output DIR [--set ...]

The selection is a manifest from `winnow sweep` (its runs are read from the manifest) and/or inline
filters (one drop_fraction or threshold per annotation, ANDed). The output is a run folder like
`winnow curate`'s: shards/ (tars and annotation tables), embeddings/, summary.json, report.html. Re-running
the same command resumes. See jobs/select_laion_aesthetic.yaml.
"""

SPEC_FILE = "spec.yaml"
# every top-level name a select run writes: output.overwrite deletes these and nothing else
ENTRIES = [SPEC_FILE, layout.SHARDS_DIR, layout.ANNOTATIONS_FILE, layout.VIDEOS_FILE, layout.EMBEDDINGS_DIR,
           layout.SUMMARY_FILE, layout.REPORT_FILE, layout.CARD_FILE]
SOURCE_RUN, SOURCE_KEY, SOURCE_PARTITION = "source_run", "source_key", "source_partition"


@dataclass
class SelectOutput:
    path: str = option(
        help="new run folder: shards/ (tars and annotation tables), embeddings/, summary.json, report.html"
    )
    samples_per_shard: int = option(1000, "selected samples per output shard", min=1, max=1_000_000)
    overwrite: bool = option(False, "delete an existing output folder made by a different selection instead of failing")
    report: bool = option(True, "write report.html at the end", runtime=True)


@dataclass
class SelectSpec:
    output: SelectOutput = field(default_factory=SelectOutput)
    runs: list[str] = option(factory=list, help="`winnow curate` output folders; default: the runs the selection's "
                                                "sweep read (in its order)")
    selection: str | None = option(None, "selection manifest (winnow sweep's selections/cell_NNN.parquet: run, key)")
    filters: list[FilterSpec] = option(factory=list, help="inline thresholds instead of (or on top of) a manifest: "
                                                          "one drop_fraction or threshold each, ANDed")
    ray: RaySettings = field(default_factory=RaySettings)


def parse(data: dict) -> SelectSpec:
    spec = build(SelectSpec, take_kind(data, "select"))
    if not spec.output.path:
        raise ConfigError("output.path: give the folder the selected shard set is written to")
    if spec.selection is None and not spec.filters:
        raise ConfigError("give selection: (a manifest from `winnow sweep`) and/or filters: (inline thresholds)")
    if spec.selection is not None and not storage.isfile(spec.selection):
        raise ConfigError(f"selection: {spec.selection!r} does not exist")
    for i, f in enumerate(spec.filters):
        if len(f.drop_fractions) + len(f.thresholds) != 1:
            raise ConfigError(f"filters[{i}]: a selection takes one level per filter (one drop_fraction or one "
                              f"threshold) for {f.column!r}; sweep several with `winnow sweep`")
    check_filters(spec.filters)
    if not spec.runs:
        spec.runs = layout.manifest_runs(spec.selection) if spec.selection else []
        if not spec.runs:
            raise ConfigError("runs: give the `winnow curate` output folders to select from (the selection manifest "
                              "does not name them)")
    for i, r in enumerate(spec.runs):
        if not storage.isdir(join(r, layout.SHARDS_DIR)) or not layout.annotation_files(r):
            raise ConfigError(f"runs[{i}]: {r!r} is not a finished `winnow curate` output (no shards/ with their "
                              f"NNNNN.parquet tables); finish that run first")
    layout.check_separate(spec.output.path, input_paths(spec))
    return spec


def input_paths(spec: SelectSpec) -> dict[str, str]:
    return {**{f"runs[{i}]": r for i, r in enumerate(spec.runs)}, "selection": spec.selection or ""}


def load(path: str | None, overrides: list[str] | None = None) -> SelectSpec:
    return parse(apply_overrides(load_yaml(path) if path else {}, overrides or []))


def _kept(file: str, columns: list[str]) -> pa.Table:
    """One annotation file's kept rows (the same rows, in the same order, on every read)."""
    t = layout.read_table(file, columns=list(dict.fromkeys([*columns, STATUS])), present=True)
    return t.filter(pc.equal(t.column(STATUS), KEPT))


def _source_values(spec: SelectSpec) -> tuple[list[tuple[int, str, int]], dict[str, np.ndarray]]:
    """Pass one: (run, file, kept rows) of every annotation file, and each filter column's values
    over all kept rows in that order (8 bytes a row per filter: the quantiles need them all)."""
    sources = list(dict.fromkeys(source_column(f.column) for f in spec.filters))
    parts: list[tuple[int, str, int]] = []
    chunks: dict[str, list[np.ndarray]] = {f.column: [] for f in spec.filters}
    for i, r in enumerate(spec.runs):
        names = layout.annotation_columns(r)
        missing = [c for c in sources if c not in names]
        if missing:
            raise ConfigError(f"filters: run {r!r} has no column {missing[0]!r}")
        for file in layout.annotation_files(r):
            t = _kept(file, sources)
            if spec.filters:
                for c in sources:
                    if c not in t.column_names:       # a shard table without the column: null there
                        t = t.append_column(c, pa.nulls(t.num_rows, pa.float64()))
                t = derive_text(t, spec.filters)
                for f in spec.filters:
                    chunks[f.column].append(values(t, f.column))
            parts.append((i, file, t.num_rows))
    return parts, {c: np.concatenate(v) if v else np.zeros(0) for c, v in chunks.items()}


def _run_keys(run: pa.Array, keys: pa.Array) -> pa.Array:
    return pc.binary_join_element_wise(pc.cast(run, pa.string()), pc.cast(keys, pa.string()), "|")


def _digest(table: pa.Table, extra: bytes) -> str:
    """sha256 over every selected "run|key", in order, however the table is chunked (the values'
    bytes and their lengths hashed apart, so no Python string is made per row)."""
    data, lengths = hashlib.sha256(), hashlib.sha256()
    for batch in table.select(["run", KEY]).to_batches():
        joined = _run_keys(batch.column(0), batch.column(1))
        if len(joined) == 0:
            continue
        offsets = np.frombuffer(joined.buffers()[1], np.int32)[joined.offset:joined.offset + len(joined) + 1]
        data.update(memoryview(joined.buffers()[2])[int(offsets[0]):int(offsets[-1])])
        lengths.update(np.diff(offsets).astype("<i8").tobytes())
    return hashlib.sha256(extra + data.digest() + lengths.digest()).hexdigest()[:16]


@dataclass
class Plan:
    table: pa.Table          # run, key, partition (source), out_partition, out_key; sorted
    source_kept: int         # kept rows over all source runs
    thresholds: dict         # what the selection applied (for the summary and report)
    fingerprint: str

    @property
    def counts(self) -> dict[int, int]:
        p, c = np.unique(self.table.column("out_partition").to_numpy(), return_counts=True)
        return {int(a): int(b) for a, b in zip(p, c, strict=True)}


def plan(spec: SelectSpec) -> Plan:
    """Which samples go to which output shard; fixed before Ray starts, so a re-run writes the same.

    Two passes over the annotation files, one file at a time: the filter columns (their drop
    fractions are quantiles of every kept row), then each file's kept keys, cut. The driver holds
    the filter values and the selected rows (run, key, partition), never the tables."""
    parts, vals = _source_values(spec)
    n = sum(k for _, _, k in parts)
    thresholds: dict = {}
    want = None
    if spec.selection:
        man = layout.read_table(spec.selection, columns=["run", KEY])
        if man.num_rows and int(pc.max(man.column("run")).as_py()) >= len(spec.runs):
            raise ConfigError(f"selection: {spec.selection!r} names run {pc.max(man.column('run')).as_py()}, but only "
                              f"{len(spec.runs)} runs are given")
        want = _run_keys(man.column("run"), man.column(KEY))
        meta = layout.read_schema(spec.selection).metadata or {}
        thresholds["manifest"] = {"path": storage.absolute(spec.selection),
                                  "cell": meta.get(b"winnow_cell", b"").decode(),
                                  "thresholds": json.loads(meta.get(b"winnow_thresholds", b"{}"))}
    levels = []
    for f in spec.filters:   # drop fractions are quantiles of all kept rows, as in the sweep
        lv = levels_for(f, vals[f.column])[0]
        levels.append(lv)
        thresholds.setdefault("filters", []).append({"column": lv.column, "keep": lv.keep, "threshold": lv.threshold,
                                                     "drop_fraction": lv.fraction})
    chosen, matched, start = [], 0, 0
    for run, file, rows in parts:
        if not rows:
            continue
        t = _kept(file, [KEY, PARTITION])
        if t.num_rows != rows:
            raise RuntimeError(f"{file}: changed while select read it ({t.num_rows} kept rows, was {rows})")
        mask = np.ones(rows, bool)
        for lv in levels:
            mask &= lv.mask(vals[lv.column][start:start + rows])
        runs = pa.array(np.full(rows, run, np.int32))
        if want is not None:
            hit = pc.is_in(_run_keys(runs, t.column(KEY)), value_set=want).to_numpy(zero_copy_only=False)
            matched += int(hit.sum())
            mask &= hit
        start += rows
        keep = pa.array(mask)
        sel = pa.table({"run": runs.filter(keep), KEY: pc.cast(t.column(KEY), pa.string()).filter(keep),
                        PARTITION: pc.cast(t.column(PARTITION), pa.int64()).filter(keep)})
        chosen.append(sel.sort_by([(PARTITION, "ascending"), (KEY, "ascending")]))
    if want is not None and matched != len(want):
        found = np.zeros(len(want), bool)          # the error's example: one key no run holds
        for run, file, _ in parts:
            t = _kept(file, [KEY])
            found |= pc.is_in(want, value_set=_run_keys(pa.array(np.full(t.num_rows, run, np.int32)),
                                                        t.column(KEY))).to_numpy(zero_copy_only=False)
        first = want[int(np.flatnonzero(~found)[0])].as_py() if (~found).any() else "?"
        raise ConfigError(f"selection: {len(want) - matched} of its {len(want)} keys are not kept samples of the "
                          f"runs (first: run|key {first}); was it made from other runs? set runs: to the folders its "
                          f"sweep read")
    if sum(c.num_rows for c in chosen) == 0:
        raise ConfigError("the selection is empty: no kept sample passes it; loosen the filters")
    sel = pa.concat_tables(chosen)
    run_col, part_col = sel.column("run").to_numpy(), sel.column(PARTITION).to_numpy()
    same_run = run_col[1:] == run_col[:-1]
    if (same_run & (part_col[1:] < part_col[:-1])).any():    # a run's files out of partition order: sort it all
        sel = sel.sort_by([("run", "ascending"), (PARTITION, "ascending"), (KEY, "ascending")])
    keys = sel.column(KEY)
    out_keys = keys
    if len(spec.runs) > 1 and pc.count_distinct(keys).as_py() != sel.num_rows:   # shared key names: prefix the run
        prefixes = pa.array([f"r{r:02d}_" for r in range(len(spec.runs))])
        out_keys = pc.binary_join_element_wise(pc.take(prefixes, sel.column("run")), keys, "")
    # the key becomes a member name of the output tar: it must not name a path (tars.unsafe_name)
    suspect = pc.or_(pc.equal(pc.utf8_length(out_keys), 0), pc.match_substring_regex(out_keys, r"[/\\\x00-\x1f]|\.\."))
    if pc.any(suspect).as_py():
        k = pc.filter(out_keys, suspect)[0].as_py()
        raise ConfigError(f"runs: the key {k!r} {tars.unsafe_name(k)}, so it cannot name a tar member; that run's "
                          f"annotations were not written by winnow curate")
    size = spec.output.samples_per_shard
    sel = sel.append_column("out_partition", pa.array((np.arange(sel.num_rows) // size).astype(np.int32)))
    sel = sel.append_column("out_key", pc.cast(out_keys, pa.string()))
    h = hashlib.sha256()
    for r in spec.runs:   # a re-curated source is a different selection
        for f in layout.annotation_files(r):
            h.update(f"{storage.absolute(f)}|{storage.stamp(f)}\n".encode())
    h.update(f"{size}\n".encode())
    return Plan(sel, n, thresholds, _digest(sel, h.digest()))


def scan_members(tar_path: str, keys: set[str]) -> dict[str, list[tars.Member]]:
    """key -> its members in ``tar_path`` (webdataset's key rule), for the keys asked for."""
    out: dict[str, list[tars.Member]] = {}
    with storage.open_read(tar_path) as fh:
        for m in tars.scan(fh):
            key = m.key
            if key in keys:
                out.setdefault(key, []).append(m)
    return out


def _sample_chunks(fh, key: str, out_key: str, members: list[tars.Member]):
    """The tar bytes of one sample: its members' header and data blocks copied as they are (one read
    when they are contiguous); rebuilt only when the key is renamed (the JSON row carries the key)."""
    if out_key == key and all(a.end == b.header for a, b in itertools.pairwise(members)) \
            and all(m.data - m.header == 512 for m in members):
        fh.seek(members[0].header)
        yield fh.read(members[-1].end - members[0].header)
        return
    for m in members:
        fh.seek(m.data)
        data = fh.read(m.size)
        if m.ext == "json" and out_key != key:
            meta = json.loads(data)
            meta[SOURCE_KEY], meta[KEY] = meta.get(KEY), out_key
            data = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
        yield tars.block(f"{out_key}.{m.ext}", data)


def write_shard(runs: list[str], rows: list[dict], out: str, partition: int) -> dict:
    """Copy one output shard's samples from their source shards; stats are written last (done marker)."""
    name = shards.shard_name(partition)
    ann, emb = [], []
    plan: list[tuple[str, str, str, list[tars.Member]]] = []    # out_key, key, source tar, members
    by_source: dict[tuple[int, int], list[dict]] = {}
    for r in rows:
        by_source.setdefault((r["run"], r[PARTITION]), []).append(r)
    for (run, src_part), rs in sorted(by_source.items()):
        base = join(runs[run], layout.SHARDS_DIR, shards.shard_name(src_part))
        new_keys = {r[KEY]: r["out_key"] for r in rs}
        keys = set(new_keys)
        chosen = pa.array(sorted(keys))
        found = scan_members(base + ".tar", keys)
        lost = keys - set(found)
        if lost:
            raise RuntimeError(f"{base}.tar lacks {len(lost)} selected samples (first {sorted(lost)[0]}); "
                               f"was the source run changed?")
        plan += [(r["out_key"], r[KEY], base + ".tar", found[r[KEY]]) for r in rs]
        t = layout.read_table(base + ".parquet")
        t = t.filter(pc.is_in(t.column(KEY), value_set=chosen))
        ann.append(_relabel(t, new_keys, runs[run], partition))
        emb_path = join(runs[run], layout.EMBEDDINGS_DIR, shards.shard_name(src_part) + ".parquet")
        if storage.exists(emb_path):
            e = layout.read_table(emb_path)
            e = e.filter(pc.is_in(e.column(KEY), value_set=chosen))
            emb.append(_relabel(e, new_keys))
    table = pa.concat_tables(ann, promote_options="permissive")
    table = table.take(pc.sort_indices(table.column(KEY)))
    if table.num_rows != len(rows):
        raise RuntimeError(f"shard {name}: {table.num_rows} annotation rows for {len(rows)} samples")
    plan.sort(key=lambda p: p[0])          # the tar lists samples in key order, like the parquet

    def chunks():
        files: dict[str, object] = {}
        size = 0
        try:
            for out_key, key, tar, members in plan:
                if tar not in files:
                    files[tar] = storage.open_read(tar)
                for c in _sample_chunks(files[tar], key, out_key, members):
                    size += len(c)
                    yield c
        finally:
            for f in files.values():
                f.close()
        yield tars.end(size)

    embeddings = None
    if emb:
        e = pa.concat_tables(emb, promote_options="permissive")
        embeddings = e.take(pc.sort_indices(e.column(KEY)))
    stats = {"shard": name, "partition": partition, "count": len(rows), "kept": len(rows), "rejected": 0,
             "reasons": {}, "stage_seconds": {},
             "sources": sorted({join(runs[r], layout.SHARDS_DIR, shards.shard_name(p) + ".tar")
                                for r, p in by_source})}
    return shards.commit_shard(join(out, layout.SHARDS_DIR), partition, chunks(), table, stats, embeddings)


def _relabel(t: pa.Table, new_keys: dict[str, str], run: str | None = None, partition: int | None = None) -> pa.Table:
    """Output rows: keys renamed where runs collide, the output's partition, the source noted."""
    old = t.column(KEY).to_pylist()
    if any(new_keys[k] != k for k in old):
        t = t.set_column(t.column_names.index(KEY), KEY, pa.array([new_keys[k] for k in old], pa.string()))
        t = t.append_column(SOURCE_KEY, pa.array(old, pa.string()))
    if partition is not None:
        src = t.column(PARTITION)
        t = t.set_column(t.column_names.index(PARTITION), PARTITION, pa.array(np.full(t.num_rows, partition, np.int64)))
        t = t.append_column(SOURCE_PARTITION, src)
    if run is not None:
        t = t.append_column(SOURCE_RUN, pa.array([run] * t.num_rows, pa.string()))
    return t


@dataclass
class SelectResult:
    output: str
    source_kept: int
    selected: int
    shards: int
    thresholds: dict
    wall_seconds: float
    samples_per_s: float = 0.0
    report: str | None = None


def run(spec: SelectSpec, log=sys.stderr) -> SelectResult:
    started = time.time()
    p = plan(spec)
    out = spec.output.path
    doc = to_dict(spec)
    layout.claim_output(out, join(out, SPEC_FILE), p.fingerprint, doc, spec.output.overwrite, "selection",
                        "runs, selection, filters or samples_per_shard", ENTRIES, "select", input_paths(spec))
    sdir = join(out, layout.SHARDS_DIR)
    counts = p.counts
    done = shards.done_partitions(sdir)
    todo = [q for q in sorted(counts) if q not in done]
    if todo and log is not None and len(todo) < len(counts):
        print(f"resuming: {len(counts) - len(todo)} of {len(counts)} shards written by an earlier run", file=log)
    if todo:
        adapter.connect(spec.ray.address, spec.ray.num_cpus)
    t = time.time()
    if todo:
        runs = [storage.absolute(r) for r in spec.runs]
        size = spec.output.samples_per_shard   # out_partition = row // size: each shard is one slice
        adapter.run_tasks(write_shard, [(runs, p.table.slice(q * size, counts[q]).to_pylist(), out, q) for q in todo],
                          "select", "shard", log)
    copy_s = time.time() - t
    result = finalize(spec, p, started, copy_s)
    if spec.output.report:
        from pipeline.commands import report

        result.report = report.write(out)
    return result


def finalize(spec: SelectSpec, p: Plan, started: float, copy_s: float) -> SelectResult:
    out = spec.output.path
    sdir = join(out, layout.SHARDS_DIR)
    names = [shards.shard_name(q) for q in sorted(p.counts)]
    # what reconciling needs, not the selection's whole annotation table
    table = pa.concat_tables([layout.read_table(join(sdir, f"{n}.parquet"), [KEY, VIDEO_KEY, SOURCE_RUN], present=True)
                              for n in names], promote_options="permissive")
    planned = p.table.column("out_key")
    if table.num_rows != p.table.num_rows or pc.count_distinct(table.column(KEY)).as_py() != table.num_rows \
            or not pc.all(pc.is_in(table.column(KEY), value_set=planned)).as_py():
        raise RuntimeError(f"counts do not reconcile: planned {p.table.num_rows} samples, shards hold {table.num_rows}")
    # the per-shard tables are the selection's annotation table: no second copy is written
    if VIDEO_KEY in table.column_names:   # the source videos of the selected clips
        vids = []
        for r in spec.runs:
            v = layout.read_videos(r)
            if v is not None:
                chosen = table.filter(pc.equal(table.column(SOURCE_RUN), storage.absolute(r))).column(VIDEO_KEY)
                vids.append(v.filter(pc.is_in(v.column(KEY), value_set=pc.unique(chosen))))
        if vids:
            layout.atomic_write(join(out, layout.VIDEOS_FILE),
                                layout.table_bytes(pa.concat_tables(vids, promote_options="permissive")))
    wall = time.time() - started
    result = SelectResult(out, p.source_kept, table.num_rows, len(names), p.thresholds, round(wall, 2),
                          round(table.num_rows / copy_s, 1) if copy_s > 0.01 else 0.0)
    summary = {
        "output": out,
        "kind": "selection",
        "inputs": table.num_rows,
        "kept": table.num_rows,
        "rejected": 0,
        "reasons": {},
        "stage_seconds": {},
        "phases": {"copy": round(copy_s, 3)},
        "wall_seconds": result.wall_seconds,
        "shards": len(names),
        "format": "selection",
        "kept_fraction": 1.0,
        "source_runs": [storage.absolute(r) for r in spec.runs],
        "source_kept": p.source_kept,
        "selection": p.thresholds,
        "warnings": []
        if table.num_rows
        else [
            "the selection keeps 0 samples: its thresholds lie beyond every "
            "kept sample's scores; loosen them (winnow sweep shows the range)"
        ],
    }
    layout.atomic_write(join(out, layout.SUMMARY_FILE), json.dumps(summary, indent=2).encode())
    layout.write_dataset_card(out, "select", summary)
    return result


def format_summary(r: SelectResult) -> str:
    lines = [f"winnow select: {r.output}"]
    if not r.selected:
        lines.append("  warning: the selection keeps 0 samples: its thresholds lie beyond every kept sample's scores; "
                     "loosen them (winnow sweep shows the range)")
    lines += [f"  source kept  {r.source_kept:>9}",
             f"  selected     {r.selected:>9}  ({100 * r.selected / max(1, r.source_kept):.1f} %)",
             f"  shards       {r.shards:>9}"]
    man = r.thresholds.get("manifest")
    if man:
        lines.append(f"  manifest     {man['path']} ({man['cell'] or 'no cell name'})")
    for f in r.thresholds.get("filters", []):
        op = ">=" if f["keep"] == "high" else "<="
        lines.append(f"  filter       {f['column']} {op} {f['threshold']:.6g}")
    rate = f"; {r.samples_per_s:,.0f} samples/s copied" if r.samples_per_s else ""
    lines.append(f"  wall time {r.wall_seconds:.1f} s{rate}; shards in {join(r.output, 'shards')}")
    if r.report:
        lines.append(f"  report       {r.report}")
    return "\n".join(lines)


__all__ = ["Plan", "SelectSpec", "format_summary", "load", "parse", "plan", "run", "write_shard"]


def arguments(parser) -> None:
    from pipeline.commands import add_set_argument

    parser.add_argument("spec", nargs="?", help="select spec YAML (see jobs/select_laion_aesthetic.yaml)")
    parser.add_argument("--selection", help="selection manifest (winnow sweep's selections/cell_NNN.parquet)")
    parser.add_argument("--output", help="output folder")
    add_set_argument(parser)


def from_args(args) -> SelectSpec:
    data = load_yaml(args.spec) if args.spec else {}
    if args.selection:
        data["selection"] = args.selection
    if args.output:
        data.setdefault("output", {})["path"] = args.output
    return parse(apply_overrides(data, args.set))
