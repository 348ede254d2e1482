"""``winnow curate SPEC --dry-run``: what a run would cost, measured on a sample, before launching it.

The whole input is planned (listed, as a run does). A sample of it, evenly spread over the plan's
order so that every folder and parquet file is represented, then runs through every stage on the
cluster the run would use, into a scratch folder beside the output (the same storage, so every
node can reach it) that is deleted at the end: nothing is written into the output folder.

Projections, each from what the sample measured, not from assumptions:

* wall time: the annotate pass as a fixed start-up (Ray Data planning, actor and model start,
  the first block through every stage) plus a steady rate: inputs per second between the first
  and the last output batch, but never more than an actor-pool bottleneck allows (its queue
  drains alone once the upstream stages are done, faster than a full run's middle); shard writing
  per input; the real planning time of the whole input. On N nodes like these the rate-bound
  parts scale by N (start-up and planning do not);
* the bottleneck: each stage's worker seconds per row against the copies it has (an actor pool's
  size; the task slots the fused task stages share);
* kept fraction and each reject reason's fraction: the sample's. Run-level reductions
  (``phash_dedup``, ``semantic_dedup``) find more duplicates in a bigger input, so their fraction
  is a lower bound;
* output bytes: the sample's output (shards, annotations, embeddings) per input;
* GPU-hours: GPUs the pools hold times the projected annotate time.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from pipeline import adapter, readers
from pipeline.commands.curate_spec import CurateSpec
from pipeline.contract import storage
from pipeline.contract.schema import PARTITION

DEFAULT_SCALES = (2, 4, 10)


@dataclasses.dataclass
class DryRunResult:
    output: str
    inputs: int                     # the whole input (videos for a video run)
    sampled: int
    unit: str
    sample_rows: int                # rows the sample produced (clips and segments for videos)
    sample_wall_s: float
    cluster: dict                   # cpus, gpus, nodes
    stages: list[dict]              # label, kind, copies, seconds per row, capacity rows/s
    bottleneck_stage: str
    projected_wall_s: float
    projected_wall_s_on: dict[int, float]
    projected_phases_s: dict[str, float]
    kept_fraction: float
    reject_fractions: dict[str, float]
    projected_rows: int
    projected_kept: int
    projected_output_bytes: int
    gpu_hours: float
    notes: list[str]
    store: dict = dataclasses.field(default_factory=dict)   # the output store's measured write and read rates (MB/s)
    print_json: bool = False        # how to print it (output.json), not part of it

    dry_run = True

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "print_json"}
        d["projected_wall_s_on"] = {str(k): v for k, v in self.projected_wall_s_on.items()}
        return d


def sample_plan(job: readers.Plan, n: int, per_shard: int) -> readers.Plan:
    """``n`` inputs evenly spread over the plan's order (the middle of each of ``n`` equal runs),
    re-partitioned ``per_shard`` to a shard so the sample's shards are as full as the run's."""
    total = job.num_inputs
    idx = list(range(total)) if n >= total else [int((i + 0.5) * total / n) for i in range(n)]
    table = job.table.take(pa.array(idx, pa.int64())) if job.table is not None else job.streamed.take(idx)
    parts = [i // per_shard for i in range(len(idx))]
    table = table.set_column(table.column_names.index(PARTITION), PARTITION,
                             pa.array(parts, table.schema.field(PARTITION).type))
    return readers.Plan(table, job.format, dict(Counter(parts)), job.sidecars)


def _tree_bytes(path: str, leave_out: tuple[str, ...] = ()) -> int:
    """Bytes of the files under ``path`` (a folder or a prefix on a store), but ``leave_out`` (names
    directly under it)."""
    return sum(e["bytes"] for e in storage.walk(path) if e["rel"] not in leave_out)


def _annotate_model(trace: list[tuple[float, int]]) -> tuple[float, float, int]:
    """(start-up seconds, steady inputs/s, inputs done at the end of start-up) from the trace."""
    t0 = trace[0][0]
    points = [(t - t0, u) for t, u in trace[1:] if u > 0]
    if not points:
        return 0.0, 0.0, 0
    first_t, first_u = points[0]
    last_t, last_u = points[-1]
    if len(points) >= 3 and last_t > first_t and last_u > first_u:
        return first_t, (last_u - first_u) / (last_t - first_t), first_u
    return 0.0, last_u / max(last_t, 1e-9), 0       # too few batches to tell start-up apart


@dataclasses.dataclass
class Curate:
    """What the dry run uses of ``curate`` (which calls it): planning, running, its steps, and the
    small files every run writes whatever its size."""

    plan: Callable[[CurateSpec], readers.Plan]
    run: Callable[..., Any]
    steps: list
    fixed_files: tuple[str, ...]


def stage_table(steps: list, shape: adapter.Shape, stage_seconds: dict[str, float], rows: int) -> list[dict]:
    """Per step: worker seconds per row and what the cluster can push through it (rows/s)."""
    plan = adapter.plan_job(steps, shape)
    held = sum(r.num_cpus * r.concurrency for r in plan.stages.values() if r.concurrency)
    ask = max([r.num_cpus for r in plan.stages.values() if not r.concurrency] or [1.0])
    slots = max(1, int((shape.cpus - held) / max(ask, 1e-9) + 1e-6))
    slots = min(slots, int(max(shape.cpus - held, 1.0) + 1e-6) or 1)   # a task uses a core, whatever it asks
    per_row = {label: stage_seconds.get(label, 0.0) / max(rows, 1) for label, _, _ in steps}
    fused = sum(per_row[label] for label, _, _ in steps if not plan.stages[label].concurrency)
    table = []
    for label, _, _ in steps:
        r = plan.stages[label]
        if r.concurrency:
            kind, copies, capacity = (
                ("gpu actors" if r.num_gpus else "actors"),
                r.concurrency,
                r.concurrency / max(per_row[label], 1e-9),
            )
        else:
            kind, copies, capacity = "tasks (fused)", slots, slots / max(fused, 1e-9)
        table.append({"stage": label, "kind": kind, "copies": copies, "seconds_per_row": round(per_row[label], 6),
                      "capacity_rows_per_s": round(capacity, 2), "num_gpus": r.num_gpus})
    return table


def bottleneck(table: list[dict]) -> str:
    """The stage with the least capacity; among fused task stages (one capacity) the costliest."""
    return min(table, key=lambda s: (s["capacity_rows_per_s"], -s["seconds_per_row"]))["stage"]


def scratch_for(output: str) -> tuple[str, str | None]:
    """A fresh folder beside ``output`` (same storage, reachable from every node), never inside it;
    and the parent folder when this made it (removed again afterwards if left empty). On a store:
    a fresh prefix beside the output's."""
    if storage.is_url(output):
        out = output.rstrip("/")
        return f"{out}.dry-run-{uuid.uuid4().hex[:8]}", None
    out = os.path.abspath(output)
    parent = os.path.dirname(out)
    made = None
    if not os.path.isdir(parent):
        made = parent
        while not os.path.isdir(os.path.dirname(made)):
            made = os.path.dirname(made)
        os.makedirs(parent)
    return tempfile.mkdtemp(prefix=os.path.basename(out) + ".dry-run-", dir=parent), made


def _remove_made(scratch: str, made: str | None) -> None:
    if storage.is_url(scratch):
        storage.remove_tree(scratch)              # keys this process wrote under its own fresh prefix
        return
    shutil.rmtree(scratch, ignore_errors=True)   # made by this process
    if made:
        parent = os.path.dirname(scratch)
        while True:                               # the folders made for it, if nothing else is in them
            try:
                os.rmdir(parent)
            except OSError:
                break
            if parent == made:
                break
            parent = os.path.dirname(parent)


def run(spec: CurateSpec, log, curate: Curate) -> DryRunResult:
    started = time.time()
    job = curate.plan(spec)                      # the whole input, as the run would list it
    plan_s = time.time() - started
    unit = "videos" if spec.is_video else "inputs"
    n = max(4, spec.dry_run.sample // 10) if spec.is_video else spec.dry_run.sample
    per_shard = spec.output.videos_per_shard if spec.is_video else spec.output.samples_per_shard
    sample = sample_plan(job, n, per_shard)
    scratch, made = scratch_for(spec.output.path)
    try:
        out = storage.join(scratch, "out")
        sspec = dataclasses.replace(
            spec,
            output=dataclasses.replace(spec.output, path=out, report=False, overwrite=False, keep_work=False),
            dry_run=dataclasses.replace(spec.dry_run, enabled=False),
            # the sample's blocks as small as needed to see a steady rate
            ray=dataclasses.replace(spec.ray, block_rows=max(4, min(spec.ray.block_rows, n // 16))),
        )
        if log is not None:
            print(f"dry run: {sample.num_inputs} of {job.num_inputs} {unit}, spread over the whole input, through "
                  f"every stage (scratch {scratch})", file=log)
        trace: list[tuple[float, int]] = []
        t = time.time()
        result = curate.run(sspec, log, job=sample, trace=trace)
        sample_wall = time.time() - t
        out_bytes = _tree_bytes(out, tuple(curate.fixed_files))
        store = storage.measure_rates(storage.join(scratch, "rates"))
    finally:
        _remove_made(scratch, made)
    shape = adapter.cluster_shape()
    r = project(spec, curate.steps, job.num_inputs, sample.num_inputs, unit, result, trace, plan_s, sample_wall,
                out_bytes, shape)
    r.store = store
    w = store["write_mb_s"]
    r.notes.append(
        f"the output's store took {w:,.1f} MB/s written and {store['read_mb_s']:,.1f} MB/s read from "
        f"this node ({store['probe_mb']:g} MB probe): the projected output alone takes "
        f"{_human_s(r.projected_output_bytes / 1e6 / max(w, 1e-9))} to write from one node, less from several"
    )
    return r


def project(
    spec: CurateSpec,
    steps: list,
    total: int,
    sampled: int,
    unit: str,
    result,
    trace,
    plan_s: float,
    sample_wall: float,
    out_bytes: int,
    shape: adapter.Shape,
) -> DryRunResult:
    ratio = total / max(sampled, 1)
    table = stage_table(steps, shape, result.stage_seconds, result.inputs)
    startup, rate, first = _annotate_model(trace)
    # an actor pool's queue drains in the sample's tail with the upstream stages done, so the rate
    # measured there beats what that pool allows while all stages share the cores: never project
    # past an actor-pool bottleneck (fused task stages have no such tail: their rate is measured)
    rows_per_input = result.inputs / max(sampled, 1)
    slowest = min(table, key=lambda s: s["capacity_rows_per_s"])
    if "actors" in slowest["kind"]:
        rate = min(rate, slowest["capacity_rows_per_s"] / max(rows_per_input, 1e-9))
    annotate_s = startup + max(total - first, 0) / max(rate, 1e-9)     # start-up saw the first block out
    phases = result.phases
    shards_s = phases.get("shards", 0.0) * ratio
    reduce_s = phases.get("reduce", 0.0) * ratio
    nodes = shape.nodes
    scaled = {"annotate": annotate_s - startup, "shards": shards_s}
    fixed = {"plan": plan_s, "annotate_startup": startup, "reduce": reduce_s}
    wall = sum(scaled.values()) + sum(fixed.values())
    scales = sorted(set(spec.dry_run.nodes or [nodes * k for k in DEFAULT_SCALES]))
    on = {int(k): round(sum(v * nodes / k for v in scaled.values()) + sum(fixed.values()), 1) for k in scales}
    gpus_held = sum(s["num_gpus"] * s["copies"] for s in table if s["num_gpus"])
    rows = result.inputs
    reductions = [st.label for st in spec.stages if _reduces(st.name)]
    notes = [f"not in the projection: starting or joining Ray, once per job ({adapter.CONNECT_SECONDS:.1f} s here"
             + (")" if adapter.CONNECT_SECONDS else "; it was up already)")]
    if reductions:
        notes.append(f"{', '.join(reductions)} compare samples with each other: a bigger input has more duplicates, "
                     f"so their reject fraction here is a lower bound")
    if sampled == total:
        notes.append("the sample is the whole input: its kept fraction and bytes are the run's own")
    for st in table:   # captions are the slowest stage of real video curation: their cost on its own line
        if st["stage"].split("_")[0] == "caption":
            hours = st["seconds_per_row"] * rows * ratio / 3600
            unit = "GPU-hours" if st["num_gpus"] else "worker-hours"
            notes.append(f"{st['stage']}: {1000 * st['seconds_per_row']:.1f} ms per row (rows reaching it: only "
                         f"those kept so far) -> about {hours * max(st['num_gpus'], 1):,.2f} {unit} for the whole "
                         f"input ({st['copies']} copies: {_human_s(hours * 3600 / max(st['copies'], 1))})")
    return DryRunResult(
        output=spec.output.path, inputs=total, sampled=sampled, unit=unit, sample_rows=rows,
        sample_wall_s=round(sample_wall, 2),
        cluster={"cpus": shape.cpus, "gpus": shape.gpus, "nodes": nodes},
        stages=table, bottleneck_stage=bottleneck(table),
        projected_wall_s=round(wall, 1), projected_wall_s_on=on,
        projected_phases_s={k: round(v, 1) for k, v in {**fixed, **scaled}.items()},
        kept_fraction=round(result.kept / max(rows, 1), 4),
        reject_fractions={k: round(v / max(rows, 1), 4) for k, v in result.reasons.items()},
        projected_rows=round(rows * ratio), projected_kept=round(result.kept * ratio),
        projected_output_bytes=int(out_bytes * ratio),
        gpu_hours=round(gpus_held * annotate_s / 3600, 3), notes=notes)


def _reduces(stage_name: str) -> bool:
    from pipeline import registry

    return registry.get(stage_name).has_reduce_method()


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n} B"


def _human_s(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 2 * 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def format_summary(r: DryRunResult) -> str:
    c = r.cluster
    lines = [f"winnow curate --dry-run: {r.output} (nothing written there)",
             f"  input      {r.inputs:,} {r.unit}; sampled {r.sampled:,} spread over it -> {r.sample_rows:,} rows in "
             f"{r.sample_wall_s:.1f} s",
             f"  cluster    {c['cpus']:g} CPUs, {c['gpus']:g} GPUs, {c['nodes']} node(s)",
             "  stages     (worker seconds per row; rows/s this cluster can push through each)"]
    for s in r.stages:
        mark = "  <- bottleneck" if s["stage"] == r.bottleneck_stage else ""
        lines.append(
            f"    {s['stage']:<18} {s['kind']:<14} x{s['copies']:<4} {1000 * s['seconds_per_row']:>9.2f} ms/row "
            f"{s['capacity_rows_per_s']:>10,.1f} rows/s{mark}"
        )
    p = r.projected_phases_s
    lines.append(f"  projected  wall time {_human_s(r.projected_wall_s)} on this cluster ("
                 + ", ".join(f"{k} {_human_s(v)}" for k, v in p.items()) + ")")
    for k, v in r.projected_wall_s_on.items():
        lines.append(f"             on {k} nodes like these: {_human_s(v)}")
    lines.append(
        f"  kept       {100 * r.kept_fraction:.1f} % -> about {r.projected_kept:,} of {r.projected_rows:,} rows"
    )
    for reason, f in r.reject_fractions.items():
        lines.append(f"    {reason:<22} {100 * f:>6.1f} %")
    lines.append(f"  output     about {_human_bytes(r.projected_output_bytes)}")
    if r.store:
        lines.append(f"  store      write {r.store['write_mb_s']:,.1f} MB/s, read {r.store['read_mb_s']:,.1f} MB/s "
                     f"(measured from this node on the output's store)")
    if r.gpu_hours:
        lines.append(f"  GPU-hours  {r.gpu_hours:,.2f}")
    lines += [f"  note: {n}" for n in r.notes]
    if r.print_json:
        lines.append(json.dumps(r.to_dict(), sort_keys=True))
    return "\n".join(lines)
