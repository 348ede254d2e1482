"""Run a curate job: plan -> annotate (Ray Data) -> run-level reductions (dedup) -> shards -> table.

Each phase resumes: annotation skips keys already in fragments, shard writing skips shards
with a ``_stats.json``. Killing the job at any point and running it again gives the same
shards as an uninterrupted run, with no sample twice and none lost.
"""
from __future__ import annotations

import itertools
import json
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from pipeline import adapter, readers, registry, shards
from pipeline.commands.curate_spec import CurateSpec
from pipeline.contract import layout, storage
from pipeline.contract.config import ConfigError
from pipeline.contract.schema import CAPTION_COLUMNS, CAPTION_ISSUE, KEY, PARTITION, REJECT_REASON, STATUS
from pipeline.contract.stage import reason_counts

NAME = "curate"
DESCRIPTION = """\
Curate a corpus into WebDataset shards and one annotation table.

  winnow curate SPEC.yaml [--set dotted.key=value ...]
  winnow curate --input PATH --output DIR [--samples-per-shard N] [--set ...]

The input may be a folder of images (with optional NAME.txt captions), a LAION-style
parquet of paths + captions, img2dataset .tar shards, or a folder (or parquet) of videos,
which are cut into clips (see jobs/lvd_video_curation.yaml). Re-running the same command on the
same output folder resumes an interrupted run. See jobs/*.yaml for full specs.
"""

SPEC_FILE = "spec.yaml"
# every top-level name a curate run writes: output.overwrite deletes these and nothing else
ENTRIES = [
    SPEC_FILE,
    layout.SHARDS_DIR,
    layout.WORK_DIR,
    layout.ANNOTATIONS_FILE,
    layout.VIDEOS_FILE,
    layout.VIDEO_ROWS_DIR,
    layout.EMBEDDINGS_DIR,
    layout.SUMMARY_FILE,
    layout.REPORT_FILE,
    layout.CARD_FILE,
]


@dataclass
class RunResult:
    output: str
    inputs: int
    kept: int
    rejected: int
    reasons: dict[str, int]
    stage_seconds: dict[str, float]
    wall_seconds: float
    phases: dict[str, float] = field(default_factory=dict)
    videos: dict | None = None     # video runs: input videos, with clips, without (per reason)
    report: str | None = None      # report.html, when written
    sidecars: int = 0              # caption / JSON files beside the samples (read, not samples themselves)
    stage_rss_mb: dict[str, float] = field(default_factory=dict)   # peak RSS of a worker running each stage
    warnings: list[str] = field(default_factory=list)   # what the user must know (models on random weights)
    already_complete: bool = False  # a re-run that found every shard written: nothing was redone
    captions: dict = field(default_factory=dict)   # caption stage: per column, model, settings, written/empty/issues
    print_json: bool = False       # how to print it (output.json), not part of it

    @property
    def kept_fraction(self) -> float:
        return round(self.kept / max(1, self.inputs), 4)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "print_json"}


def prepare_output(spec: CurateSpec) -> None:
    """Create the output folder, or check that it belongs to this same spec (resume)."""
    out = spec.output.path
    layout.claim_output(out, storage.join(out, SPEC_FILE), spec.fingerprint(), spec.to_dict(), spec.output.overwrite,
                        "run", "input, samples_per_shard or stages", ENTRIES, "curate", input_paths(spec))
    storage.makedirs(storage.join(out, layout.WORK_DIR))


def input_paths(spec: CurateSpec) -> dict[str, str]:
    return {k: v for k, v in {"input.path": spec.input.path, "input.base_dir": spec.input.base_dir}.items() if v}


def init_ray(spec: CurateSpec) -> adapter.Shape:
    adapter.connect(spec.ray.address, spec.ray.num_cpus)
    adapter.configure(spec.ray.no_progress_timeout_s, spec.ray.progress_bars,
                      has_actor_stages=any(registry.get(s.name).stateful for s in spec.stages))
    return adapter.cluster_shape()


MAX_BLOCKS = 4096   # a larger plan gets larger blocks: a Ray task costs ~10 ms and a ref, whatever its rows


def _blocks(table: pa.Table, rows: int, cap: bool = True, slots: int = 1) -> list[pa.Table]:
    """The plan cut into blocks of at most ``rows`` (``ray.block_rows``), or (``cap``) into about
    ``MAX_BLOCKS`` blocks when that is fewer: the stages still see batches of their own size inside a
    block, while per-task overhead and the driver's refs stop growing with the input
    (bench/scale.py, curate). The number of blocks is a multiple of ``slots`` (the chain tasks that
    run at once) and their sizes differ by at most one row: the last wave of tasks is then as full
    as the others. Cut at ``rows`` alone, 652 rows in blocks of 32 are 21 blocks on 2 workers, and
    one worker decodes the 21st while the other idles (a block's time: ~1 s of a 12 s pass in
    bench/curate_images.py)."""
    total = table.num_rows
    if total == 0:
        return []
    n = -(-total // max(rows, 1))
    slots = max(int(slots), 1)
    if cap and n > MAX_BLOCKS:
        n = max(MAX_BLOCKS // slots, 1) * slots
    n = min(-(-n // slots) * slots, total)
    bounds = [i * total // n for i in range(n + 1)]
    return [table.slice(a, b - a) for a, b in itertools.pairwise(bounds)]


def steps_of(spec: CurateSpec) -> list[tuple[str, type, object]]:
    """The annotate pass's steps ``(label, class, config)``: the reader (load, or a fan-out stage's
    reader) and every stage with per-batch work, in order."""
    fan = spec.fan_out
    first_cfg = fan.with_input(spec.stages[0].config, spec.input) if fan else None
    load_cfg = readers.LoadConfig(policy=spec.input.policy(), keep_columns=spec.input.keep_columns)
    steps = [(fan.reader_label, fan.reader, first_cfg) if fan else ("load", readers.LoadSource, load_cfg)]
    return steps + [(st.label, registry.get(st.name), first_cfg if fan and st is spec.stages[0] else st.config)
                    for st in spec.stages if registry.get(st.name).has_batch_work]


def annotate(spec: CurateSpec, pending: pa.Table | Streamed, work: str, shape: adapter.Shape, log,
             skip_keys: frozenset = frozenset(), trace: list | None = None) -> None:
    """``pending``: the plan rows left, or their blocks already in the object store (``Streamed``).
    ``trace``, when given, gets ``(time, inputs done)`` at the start and after every output batch
    (a video counts as done at its first clip rows): the dry run's throughput curve."""
    fan = spec.fan_out
    steps = steps_of(spec)
    job = adapter.plan_job(steps, shape)
    if isinstance(pending, Streamed):
        ds = adapter.from_block_refs(pending.refs)
    else:   # fan-out: one block per input (its rows fan out from there: a video's windows, then clips)
        slots = adapter.chain_slots(job, steps, shape)
        ds = adapter.from_blocks(_blocks(pending, 1, cap=False) if fan
                                 else _blocks(pending, spec.ray.block_rows, slots=slots))
    writer = shards.FragmentWriter(work, skip_keys)
    # runs of task stages become one function each (adapter.TimedChain); model stages, actor pools
    groups = [(stateful, list(g)) for stateful, g in itertools.groupby(steps, key=lambda s: s[1].stateful)]
    for n, (stateful, group) in enumerate(groups):
        if stateful:
            for label, cls, cfg in group:
                ds = adapter.apply_stage(ds, cls, cfg, label, job.stages[label], shape.cpus, shape.gpus)
        else:
            last = n == len(groups) - 1
            ds = adapter.apply_chain(ds, group, job, shape, tail=writer if last else None)
    if groups[-1][0]:            # the last step holds a model: the writer runs as its own task
        ds = adapter.apply_fn(ds, writer, num_cpus=min(1.0, job.task_cpus))
    bar = tqdm(total=None if fan else pending.num_rows, desc="annotate", unit=fan.unit if fan else "img", file=log,
               disable=log is None)
    videos: set = set()
    done = 0
    if trace is not None:
        trace.append((time.time(), 0))
    for batch in adapter.iter_batches(ds):
        bar.update(len(batch[KEY]))
        if trace is not None:
            if fan:
                videos.update(fan.input_key(k) for k in batch[KEY])     # the writer hands back row keys only
            done = len(videos) if fan else done + len(batch[KEY])
            trace.append((time.time(), done))
    bar.close()


@dataclass
class Streamed:
    """A streamed plan's rows left to annotate, as blocks Ray tasks made (``adapter.plan_blocks``)."""
    refs: list
    num_rows: int


def _stream_pending(spec: CurateSpec, job: readers.Plan, work: str, finished: set[int], log) -> tuple[Streamed, int]:
    """The blocks of a streamed plan's rows not annotated yet (not in a fragment, not in a written
    shard), made by Ray tasks reading the parquet; and how many rows earlier runs annotated. The
    done keys travel as one Arrow array (only on a resumed run)."""
    st = job.streamed
    table = shards.read_fragments(shards.fragment_files(work), columns=[KEY])
    done = readers.row_numbers(table.column(KEY), st.samples_per_shard) if table is not None else None
    rows = max(spec.ray.block_rows, -(-st.num_rows // MAX_BLOCKS))
    pieces = [p for p in st.pieces
              if any(q not in finished for q in range(p.offset // st.samples_per_shard,
                                                       (p.offset + p.rows - 1) // st.samples_per_shard + 1))]
    refs, n = adapter.plan_blocks(st, "blocks", pieces, (rows, done, sorted(finished)), log)
    return Streamed(refs, n), 0 if done is None else len(done)


def reduce_stages(spec: CurateSpec, work: str, phases: dict | None = None) -> dict[str, tuple[str, str | None]]:
    decisions: dict[str, tuple[str, str | None]] = {}
    for st in spec.stages:
        cls = registry.get(st.name)
        if not cls.has_reduce_method():
            continue
        t = time.time()
        # the reduction's files are this node's (a killed run's are gone with its scratch folder and redone);
        # rows a previous reduction rejected are not candidates any more
        with storage.scratch(f"winnow-reduce-{st.label}-") as scratch:
            rows = shards.FragmentRows(work, exclude=set(decisions), scratch=scratch)
            decisions.update(cls(st.config).reduce(rows))
        if phases is not None:
            phases[f"reduce:{st.label}"] = round(time.time() - t, 3)
    return decisions


def write_shards(spec: CurateSpec, counts: dict[int, int], work: str, decisions, log,
                 part_of: dict[str, int] | None = None) -> None:
    """``part_of``: plan key -> partition (keys need not start with it: img2dataset's are kept);
    a clip's plan key is its video's (``FanOut.input_key``)."""
    shards_dir = storage.join(spec.output.path, layout.SHARDS_DIR)
    done = shards.done_partitions(shards_dir)
    todo = [p for p in sorted(counts) if p not in done]
    if not todo:
        return
    by_part: dict[int, dict] = {p: {} for p in todo}
    part_of = part_of or {}
    fan = spec.fan_out
    for key, d in decisions.items():
        p = part_of.get(key if key in part_of or fan is None else fan.input_key(key))
        if p in by_part:
            by_part[p][key] = d
    split = spec.fan_out.split_rows if spec.fan_out else None
    adapter.run_tasks(
        shards.write_shard, [(work, shards_dir, p, counts[p], by_part[p], split, spec.output.caption) for p in todo],
        "shards", "shard", log
    )


def finalize(spec: CurateSpec, plan: readers.Plan, started: float, phases: dict,
             already_complete: bool = False) -> RunResult:
    out = spec.output.path
    shards_dir = storage.join(out, layout.SHARDS_DIR)
    stats = []
    # the per-shard tables are the annotation table (layout.read_annotations): no second copy is written.
    # Counted a shard at a time, reading only the columns counted: the driver never holds the table.
    captioned = any(s.name == "caption" for s in spec.stages)
    columns = [STATUS, REJECT_REASON] + ([CAPTION_ISSUE, *CAPTION_COLUMNS] if captioned else [])
    rows = kept = 0
    reasons: dict[str, int] = {}
    kept_tables = []
    for p in sorted(plan.counts):
        name = shards.shard_name(p)
        part = layout.read_table(storage.join(shards_dir, f"{name}.parquet"), columns, present=True)
        stats.append(json.loads(storage.read_bytes(storage.join(shards_dir, f"{name}_stats.json"))))
        is_kept = pc.equal(part.column(STATUS), "kept")
        rows += part.num_rows
        kept += int(pc.sum(is_kept).as_py() or 0)
        for reason, n in reason_counts(r for r in part.column(REJECT_REASON).to_pylist() if r).items():
            reasons[reason] = reasons.get(reason, 0) + n
        if captioned:
            kept_tables.append(part.filter(is_kept))
    reasons = dict(sorted(reasons.items(), key=lambda kv: -kv[1]))
    videos = None
    if spec.is_video:
        vt = pa.concat_tables(
            [
                layout.read_table(storage.join(out, layout.VIDEO_ROWS_DIR, f"{shards.shard_name(p)}.parquet"))
                for p in sorted(plan.counts)
            ],
            promote_options="permissive",
        ).sort_by(KEY)
        videos = spec.fan_out.counts(vt)
        if videos["inputs"] != plan.num_inputs:
            raise RuntimeError(f"counts do not reconcile: plan {plan.num_inputs} videos, videos/ {videos['inputs']}")
    stage_seconds: dict[str, float] = {}
    stage_rss: dict[str, float] = {}
    for s in stats:
        for k, v in s["stage_seconds"].items():
            stage_seconds[k] = stage_seconds.get(k, 0.0) + v
        for k, v in s.get("stage_rss_mb", {}).items():
            stage_rss[k] = max(stage_rss.get(k, 0.0), v)
    result = RunResult(output=out, inputs=rows, kept=kept, rejected=rows - kept,
                       reasons=reasons,
                       stage_seconds={k: round(v, 3) for k, v in stage_seconds.items()},
                       wall_seconds=round(time.time() - started, 2), phases=phases, videos=videos,
                       sidecars=plan.sidecars, stage_rss_mb=stage_rss, warnings=spec.notices(),
                       already_complete=already_complete)
    if captioned:
        result.captions = caption_accounts(spec, pa.concat_tables(kept_tables, promote_options="permissive"))
    planned = result.inputs if spec.is_video else plan.num_inputs   # videos reconcile above
    if result.inputs != planned or result.kept + result.rejected != result.inputs:
        raise RuntimeError(f"counts do not reconcile: plan {plan.num_inputs}, table {result.inputs}, "
                           f"kept {result.kept} + rejected {result.rejected}")
    summary = {**result.to_dict(), "shards": len(stats), "format": plan.format,
               "kept_fraction": result.kept_fraction}
    layout.atomic_write(storage.join(out, layout.SUMMARY_FILE), json.dumps(summary, indent=2).encode())
    layout.write_dataset_card(out, "curate", summary)
    if not spec.output.keep_work:
        storage.remove_tree(storage.join(out, layout.WORK_DIR))
    return result


def caption_accounts(spec: CurateSpec, kept: pa.Table) -> dict:
    """Every kept row's generated captions accounted for (``curation.caption.accounts``); ``kept``:
    the kept rows' caption columns."""
    from curation.caption import accounts

    stages = [s for s in spec.stages if s.name == "caption"]
    if not stages:
        return {}
    cols = {c: kept.column(c).to_pylist() for c in CAPTION_COLUMNS if c in kept.column_names}
    issues = kept.column(CAPTION_ISSUE).to_pylist() if CAPTION_ISSUE in kept.column_names else []
    out: dict = {}
    for st in stages:
        out.update(accounts(st.config, cols, issues))
    return out


def check_input_kind(spec: CurateSpec, fmt: str) -> None:
    if fmt == "videos" and not spec.is_video:
        raise ConfigError(f"input.path {spec.input.path!r} holds videos, but the stages are an image run's; put a "
                          f"'clips' stage first (see jobs/lvd_video_curation.yaml), or leave stages out for the "
                          f"video defaults")
    if fmt != "videos" and spec.is_video:
        raise ConfigError(f"stages: 'clips' cuts videos, but input.path {spec.input.path!r} holds {fmt}; set "
                          f"input.format: videos if it does hold videos")


def run(spec: CurateSpec, log=sys.stderr):
    """Run (or resume) a curate job, then write its report. Config problems raise ConfigError before Ray starts.
    With ``dry_run.enabled`` it only measures a sample and projects the run (``dry_run.DryRunResult``)."""
    if spec.dry_run.enabled:
        from pipeline.commands import dry_run

        result = dry_run.run(spec, log, dry_run.Curate(plan, _run, steps_of(spec),
                                                        (SPEC_FILE, layout.SUMMARY_FILE, layout.CARD_FILE)))
        result.print_json = spec.output.json
        return result
    result = _run(spec, log)
    result.print_json = spec.output.json
    if spec.output.report:
        from pipeline.commands import report

        result.report = report.write(spec.output.path)
    return result


def _run(spec: CurateSpec, log, job: readers.Plan | None = None, trace: list | None = None) -> RunResult:
    """``job``: a plan made already (the dry run's sample of one); ``trace``: see ``annotate``."""
    started = time.time()
    phases: dict[str, float] = {}
    t = time.time()
    job = job or plan(spec)
    phases["plan"] = round(time.time() - t, 3)
    prepare_output(spec)
    out = spec.output.path
    work = storage.join(out, layout.WORK_DIR)
    shards_dir = storage.join(out, layout.SHARDS_DIR)
    done = shards.done_partitions(shards_dir)
    if all(p in done for p in job.counts) and storage.exists(storage.join(out, layout.SUMMARY_FILE)):
        return finalize(spec, job, started, phases, already_complete=True)
    shape = init_ray(spec)
    for st in spec.stages:  # fail on impossible resources before any work starts
        adapter.check_resources(registry.get(st.name), shape.cpus, shape.gpus, st.config)
    t = time.time()
    finished_parts = {p for p in job.counts if p in done}
    if job.streamed is not None:
        pending, n_have = _stream_pending(spec, job, work, finished_parts, log)
        phases["plan_rows"] = round(time.time() - t, 3)
        if log is not None and (n_have or finished_parts):
            print(f"resuming: {n_have} rows annotated and {len(finished_parts)} shards written by an earlier run; "
                  f"{pending.num_rows} samples left", file=log)
        if pending.num_rows:
            annotate(spec, pending, work, shape, log, frozenset(), trace)
        return _after_annotate(spec, job, work, finished_parts, started, phases, t, log)
    # what is left, in Arrow: no Python object per input row on the driver (bench/scale.py, curate)
    key_type, part_type = job.table.schema.field(KEY).type, job.table.schema.field(PARTITION).type
    unfinished_rows = pc.invert(pc.is_in(job.table.column(PARTITION),
                                         value_set=pa.array(sorted(finished_parts), part_type)))
    if spec.is_video:
        fan = spec.fan_out
        have, done_videos = fan.progress(shards.read_fragments(shards.fragment_files(work), fan.progress_columns))
        done_set = done_videos
        unit = "videos"
    else:
        have = shards.done_keys(work)
        done_set = have
        unit = "samples"
    left = pc.invert(pc.is_in(job.table.column(KEY), value_set=pa.array(sorted(done_set), key_type)))
    pending = job.table.filter(pc.and_(left, unfinished_rows))
    if log is not None and (have or finished_parts):
        print(f"resuming: {len(have)} rows annotated and {len(finished_parts)} shards written by an earlier run; "
              f"{pending.num_rows} {unit} left", file=log)
    if pending.num_rows:
        annotate(spec, pending, work, shape, log, frozenset(have) if spec.is_video else frozenset(), trace)
    return _after_annotate(spec, job, work, finished_parts, started, phases, t, log)


def _after_annotate(spec: CurateSpec, job: readers.Plan, work: str, finished_parts: set[int], started: float,
                    phases: dict, t: float, log) -> RunResult:
    """Reduce, write the shards, and account for every input (``finalize``)."""
    phases["annotate"] = round(time.time() - t, 3)
    counts = job.counts
    if spec.is_video:   # a video's clip count is known only now (videos are few: lists will do)
        fan = spec.fan_out
        table = shards.read_fragments(shards.fragment_files(work), fan.progress_columns)
        _, done_videos = fan.progress(table)
        keys, parts = job.table.column(KEY).to_pylist(), job.table.column(PARTITION).to_pylist()
        missing = [k for k, p in zip(keys, parts, strict=True) if k not in done_videos and p not in finished_parts]
        if missing:
            raise RuntimeError(
                f"{len(missing)} videos were not fully processed (first: {missing[0]}); re-run to finish"
            )
        counts = {p: job.counts[p] for p in finished_parts}
        if table is not None:
            tp, tc = np.unique(table.column(PARTITION).to_numpy(), return_counts=True)
            counts.update({int(p): int(c) for p, c in zip(tp, tc, strict=True) if int(p) not in finished_parts})
    t = time.time()
    unfinished = any(p not in finished_parts for p in job.counts)
    decisions = reduce_stages(spec, work, phases) if unfinished else {}
    phases["reduce"] = round(time.time() - t, 3)
    t = time.time()
    write_shards(spec, counts, work, decisions, log, _partitions_of(job, decisions, spec) if decisions else None)
    phases["shards"] = round(time.time() - t, 3)
    return finalize(spec, job, started, phases)


def _partitions_of(job: readers.Plan, decisions: dict, spec: CurateSpec) -> dict[str, int]:
    """plan key -> partition for the keys a reduction decided on (a clip's: its video's), not for every row."""
    if job.streamed is not None:      # its keys are numbered rows: the partition is the key's head
        return readers.partition_of_keys(list(decisions), job.streamed.samples_per_shard)
    table = job.table
    wanted = {spec.fan_out.input_key(k) for k in decisions} if spec.fan_out else set(decisions)
    hit = table.filter(pc.is_in(table.column(KEY), value_set=pa.array(sorted(wanted), table.schema.field(KEY).type)))
    return dict(zip(hit.column(KEY).to_pylist(), hit.column(PARTITION).to_pylist(), strict=True))


def plan(spec: CurateSpec) -> readers.Plan:
    """The inputs, their partitions and format; refuses an output that overlaps an input, or
    stages that do not fit the input's kind, before anything is read or written."""
    layout.check_separate(spec.output.path, input_paths(spec))   # before reading anything
    p = readers.plan(spec.input, spec.output.samples_per_shard, spec.output.videos_per_shard, stream=True)
    check_input_kind(spec, p.format)
    return p


def arguments(parser) -> None:
    from pipeline.commands import add_set_argument

    parser.add_argument("spec", nargs="?", help="job spec YAML (see jobs/)")
    parser.add_argument("--input", help="input path (short form, defaults for everything else)")
    parser.add_argument("--output", help="output folder")
    parser.add_argument("--samples-per-shard", type=int, default=None, help="samples per output shard (default 1000)")
    parser.add_argument("--dry-run", action="store_true",
                        help="sample the input, run every stage on this cluster, print the projected wall time, "
                             "bottleneck, kept fraction, output bytes and GPU-hours; write nothing into the output")
    parser.add_argument("--sample", type=int, default=None, help="dry run: inputs to sample (default 256)")
    parser.add_argument("--json", action="store_true", help="end the summary with one line holding it as JSON")
    add_set_argument(parser, "stages.decode.max_side=512")


def from_args(args) -> CurateSpec:
    from pipeline.commands import curate_spec

    if args.spec is None and (args.input is None or args.output is None):
        raise ConfigError("give a SPEC.yaml, or both --input PATH and --output DIR")
    base = {"input": {"path": args.input}, "output": {"path": args.output, "samples_per_shard": args.samples_per_shard,
                                                     "json": True if args.json else None},
            "dry_run": {"enabled": True if args.dry_run else None, "sample": args.sample}}
    return curate_spec.load(args.spec, args.set, base=base)


def format_summary(result) -> str:
    if getattr(result, "dry_run", False):
        from pipeline.commands import dry_run

        return dry_run.format_summary(result)
    lines = [f"winnow curate: {result.output}"]
    if result.already_complete:
        lines.append("  already complete: every shard was written by an earlier run; nothing was redone")
    lines += [f"  warning: {w}" for w in result.warnings]
    v = result.videos
    if v:
        lines += [f"  videos    {v['inputs']:>8}",
                  f"    with clips           {v['with_clips']:>6}",
                  f"    without clips        {v['without_clips']:>6}"]
        lines += [f"      {reason:<20} {n:>6}" for reason, n in v["reasons"].items()]
        lines.append("  clips and segments (a segment too short to be a clip is a rejected row)")
    lines += [f"  inputs    {result.inputs:>8}",
             f"  kept      {result.kept:>8}  ({100 * result.kept / max(1, result.inputs):.1f} %)",
             f"  rejected  {result.rejected:>8}"]
    for reason, n in result.reasons.items():
        lines.append(f"    {reason:<22} {n:>6}")
    for col, a in (getattr(result, "captions", None) or {}).items():
        issues = ", ".join(f"{k} {v}" for k, v in a["issues"].items())
        lines.append(f"  {col:<16}{a['written']:>5} of {a['rows']} kept rows captioned"
                     + (f"; issues: {issues}" if issues else ""))
    if getattr(result, "sidecars", 0):
        lines.append(f"  sidecars  {result.sidecars:>8}  (captions and JSON beside the samples; not samples)")
    if result.stage_seconds:
        lines.append("  stage time (worker seconds, all workers)")
        for stage, s in result.stage_seconds.items():
            rate = f"{result.inputs / s:,.0f} samples/s per worker" if s >= 0.005 else "negligible"
            rss = result.stage_rss_mb.get(stage)
            lines.append(f"    {stage:<22} {s:>8.2f} s  ({rate})" + (f"  worker RSS {rss:,.0f} MB" if rss else ""))
    if result.phases:
        lines.append("  phases  " + ", ".join(f"{k} {v:.1f} s" for k, v in result.phases.items()))
    lines.append(f"  wall time {result.wall_seconds:.1f} s; shards in {storage.join(result.output, 'shards')}")
    if result.report:
        lines.append(f"  report    {result.report}")
    if result.print_json:
        lines.append(json.dumps({**result.to_dict(), "kept_fraction": result.kept_fraction},
                                sort_keys=True))
    return "\n".join(lines)
