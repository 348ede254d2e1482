"""The one module that imports Ray Data: turns stages into ``map_batches`` calls, and runs the
training index pass and the latent-cache pass, all with one rule for sizing actor pools.

Cheap stages run as Ray tasks (and Ray fuses consecutive ones into one task, so a batch is
read, filtered, decoded and hashed without leaving the worker); stages that hold a model run as
a fixed actor pool. Pools are sized so they never take every CPU: on a 2-core machine an actor
pool that holds both CPUs starves the read and write tasks and the dataset hangs.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import numpy as np

from pipeline.contract.schema import (
    CAPTION_REF,
    COLUMN_TYPES,
    JSON_REF,
    PLAN_ERROR,
    REF_PATH,
    RSS_PREFIX,
    SOURCE_RAW,
    TIMING_PREFIX,
)
from pipeline.contract.stage import Resources, Stage, batch_len, ensure_status


class ResourceError(ValueError):
    """A stage asks for resources the cluster does not have; raised before the dataset runs."""


STRING_COLUMNS = frozenset({n for n, t in COLUMN_TYPES.items() if t == "string"}
                           | {REF_PATH, CAPTION_REF, JSON_REF, PLAN_ERROR, SOURCE_RAW})


def keep_strings(batch: dict) -> dict:
    """A string column that is null in every row of a block crosses Ray as Arrow's null type and
    reaches numpy as float NaN; handed on like that it becomes a float column, which Ray cannot
    merge with the next block's strings when an actor pool's batch spans both (a sample of inputs
    none of which has a caption did this). Back to None, which is also what stages test for."""
    for name in STRING_COLUMNS.intersection(batch):
        v = batch[name]
        if isinstance(v, np.ndarray) and v.dtype.kind == "f":
            batch[name] = np.full(len(v), None, dtype=object)
    return batch


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0     # Linux: KB


class StageMetrics:
    """A stage's rows, worker seconds and worker RSS as Ray metrics (``ray.util.metrics``), tagged
    with the stage: the Ray dashboard's Grafana shows rows/s as ``rate(winnow_stage_rows_total)``.
    Outside a Ray worker (a stage called directly) nothing is recorded."""

    def __init__(self):
        self._m = None

    def record(self, label: str, rows: int, seconds: float, rss_mb: float) -> None:
        if self._m is None:
            try:
                import ray
                from ray.util.metrics import Counter, Gauge

                if not ray.is_initialized():
                    self._m = False
                    return
                tags = ("stage",)
                self._m = (Counter("winnow_stage_rows_total", "rows a curate stage processed", tag_keys=tags),
                           Counter("winnow_stage_seconds_total", "worker seconds a curate stage spent", tag_keys=tags),
                           Gauge("winnow_stage_worker_rss_mb", "peak RSS of a worker running the stage", tag_keys=tags))
            except Exception:  # noqa: BLE001 - metrics are an extra: never fail a batch over them
                self._m = False
        if self._m:
            tags = {"stage": label}
            self._m[0].inc(rows, tags)
            self._m[1].inc(seconds, tags)
            self._m[2].set(rss_mb, tags)


class TimedStage:
    """Wraps a stage: builds it once per worker/actor and records its wall time per row, the
    worker's peak RSS, and both as Ray metrics."""

    def __init__(self, stage_cls: type[Stage], config: Any, label: str):
        self.stage_cls, self.config, self.label = stage_cls, config, label
        self._stage: Stage | None = None
        self._metrics = StageMetrics()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._stage is None:
            self._stage = self.stage_cls(self.config)
        ensure_status(keep_strings(batch))
        t0 = time.perf_counter()
        out = keep_strings(self._stage(batch))
        seconds = time.perf_counter() - t0
        n = batch_len(out)
        rss = peak_rss_mb()
        out[TIMING_PREFIX + self.label] = np.full(n, seconds / max(n, 1))
        out[RSS_PREFIX + self.label] = np.full(n, rss)
        self._metrics.record(self.label, n, seconds, rss)
        return out


class _ActorStage(TimedStage):
    """Actor flavour: the stage (and its model) is built in the constructor, once per actor."""

    def __init__(self, stage_cls: type[Stage], config: Any, label: str):
        super().__init__(stage_cls, config, label)
        self._stage = stage_cls(config)


def size_pool(res: Resources, stateful: bool, cluster_cpus: float, cluster_gpus: float, cpu_pools: int = 1,
              gpu_pools: int = 1, reserve: float = 1.0) -> Resources:
    """The one pool-sizing rule. CPU actor pools share what is left after ``reserve`` CPUs (one per
    CPU node) for the read, task and write steps (``cpu_pools`` = how many CPU actor pools the job has); an actor that
    asks for more than its share gets a fractional CPU so the dataset cannot deadlock. GPU pools
    get one actor per ``num_gpus`` the cluster holds, unless ``res.concurrency`` fixes the size."""
    if not stateful:
        return dataclasses.replace(res, concurrency=None)
    if res.num_gpus:
        share = max(cluster_gpus, res.num_gpus) / max(gpu_pools, 1)
        num_gpus = min(res.num_gpus, share)
        size = res.concurrency or max(1, int(share // num_gpus))
        return dataclasses.replace(res, num_gpus=num_gpus, concurrency=size)
    share = max(cluster_cpus - reserve, 0.5) / max(cpu_pools, 1)
    num_cpus = min(res.num_cpus, share)
    size = res.concurrency or max(1, int(share // num_cpus))
    return dataclasses.replace(res, num_cpus=num_cpus, concurrency=size)


@dataclasses.dataclass(frozen=True)
class Shape:
    """What the planner needs to know of a cluster: its totals and the CPUs of each alive node."""

    cpus: float
    gpus: float
    node_cpus: tuple[float, ...] = ()     # CPU nodes only (a 0-CPU head is not one)

    @property
    def nodes(self) -> int:
        return max(len(self.node_cpus), 1)

    @property
    def after_loss(self) -> float | None:
        """CPUs left when the largest node is lost; None on one node (losing it ends the run anyway)."""
        return self.cpus - max(self.node_cpus) if len(self.node_cpus) > 1 else None


def cluster_shape() -> Shape:
    """The connected cluster's ``Shape`` (``ray.nodes()``)."""
    import ray

    res = ray.cluster_resources()
    cpus = tuple(float(n["Resources"]["CPU"]) for n in ray.nodes()
                 if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0)
    return Shape(float(res.get("CPU", 1)), float(res.get("GPU", 0)), cpus)


def task_cpu_cap(cluster_cpus: float, actor_cpus: float, cpu_nodes: int) -> float:
    """The most CPU a task step (load, decode, the fragment writer...) may ask for so that one can
    always be placed, on a cluster of ``cpu_nodes`` nodes with CPUs once the actor pools hold
    ``actor_cpus`` of its ``cluster_cpus``: whatever node the actors land on, the free CPUs add up
    to the rest, so some node has at least rest / nodes free (pigeonhole). On one machine that is
    the whole rest (1 CPU as ``size_pool`` leaves it); on two 1-CPU nodes with two half-CPU actors,
    one per node, a 1-CPU task fits nowhere and the run would wait forever: it asks for 0.5."""
    free = max(cluster_cpus - actor_cpus, 0.0)
    return max(free / max(cpu_nodes, 1), 0.05)


@dataclasses.dataclass
class JobPlan:
    """Resources of every stage of one pass (by label) and the cap on its task steps."""

    stages: dict[str, Resources]
    task_cpus: float


def plan_job(stages: list[tuple[str, type[Stage], Any]], shape: Shape) -> JobPlan:
    """Plan every stage ``(label, class, config)`` of a pass on ``shape`` so that the pass survives
    the loss of any one node. Pool sizes come from ``size_pool`` on the whole cluster. On more than
    one node the actors' CPU requests are then scaled down (never their number) until, with the
    largest node gone, the restarted actors (Ray Data restarts them) leave room for the task steps:
    CPU requests are bookkeeping, and an actor that asks for 0.5 CPU still uses the core it finds.
    Without this, three 1-CPU nodes lose one and the restarted actors hold both CPUs left: no task
    can run and the pass stalls. Task steps are capped so that one fits on some node before the
    loss and after it (``task_cpu_cap``)."""
    return plan_pools([(label, cls.resources(cfg, shape.gpus), cls.stateful) for label, cls, cfg in stages], shape)


def plan_pools(needs: list[tuple[str, Resources, bool]], shape: Shape) -> JobPlan:
    """``plan_job`` on what each step asks for, ``(label, resources, stateful)``: a pass that is not
    made of stages (the latent cache's encoder pool) is planned by the same rule."""
    kinds = [res.num_gpus > 0 for _, res, stateful in needs if stateful]
    cpu_pools, gpu_pools = kinds.count(False), kinds.count(True)
    plans = {label: size_pool(res, stateful, shape.cpus, shape.gpus, cpu_pools, gpu_pools, reserve=float(shape.nodes))
             for label, res, stateful in needs}
    actors = [label for label, r in plans.items() if r.concurrency]

    def held() -> float:
        return sum(plans[a].num_cpus * plans[a].concurrency for a in actors)

    task_cpus = task_cpu_cap(shape.cpus, held(), shape.nodes)
    left = shape.after_loss
    if left is not None and actors:
        budget = max(left - (shape.nodes - 1), left / 2)   # a CPU per surviving node, or half, stays for tasks
        if held() > budget:
            scale = budget / held()
            for a in actors:
                plans[a] = dataclasses.replace(plans[a], num_cpus=round(plans[a].num_cpus * scale, 4))
        task_cpus = min(task_cpu_cap(shape.cpus, held(), shape.nodes), task_cpu_cap(left, held(), shape.nodes - 1))
    task_cpus = round(task_cpus, 4)
    for label, r in plans.items():
        if not r.concurrency:
            plans[label] = dataclasses.replace(r, num_cpus=min(r.num_cpus, task_cpus))
    return JobPlan(plans, task_cpus)


def check_resources(stage_cls: type[Stage], cluster_cpus: float, cluster_gpus: float, config: Any = None) -> None:
    res = stage_cls.resources(config, cluster_gpus)
    if res.num_gpus and cluster_gpus < res.num_gpus:
        raise ResourceError(
            f"stage {stage_cls.name!r} requests {res.num_gpus} GPU per worker but the Ray cluster has "
            f"{cluster_gpus:g} GPUs; set the stage's device to 'cpu' (or 'auto') or run on a cluster with GPUs")


def apply_stage(ds, stage_cls: type[Stage], config: Any, label: str, res: Resources, cluster_cpus: float,
                cluster_gpus: float = 0.0):
    """Append one stage to a Ray Dataset, with ``res`` as ``plan_job`` planned it."""
    from ray.data import ActorPoolStrategy

    check_resources(stage_cls, cluster_cpus, cluster_gpus, config)
    common = dict(batch_size=res.batch_size, batch_format="numpy", num_cpus=res.num_cpus,
                  zero_copy_batch=False)
    if res.num_gpus:
        common["num_gpus"] = res.num_gpus
    if stage_cls.stateful:
        return ds.map_batches(
            _ActorStage,
            fn_constructor_kwargs={"stage_cls": stage_cls, "config": config, "label": label},
            compute=ActorPoolStrategy(size=res.concurrency),
            **common,
        )
    return ds.map_batches(TimedStage(stage_cls, config, label), **common)


class TimedChain:
    """Consecutive task stages (and the fragment writer after them) as one function: a batch goes
    through all of them as numpy, with no Arrow block between two stages. Ray Data would fuse them
    into one task anyway, but still turns each stage's output into a block and back."""

    def __init__(self, steps: list[tuple[str, type[Stage], Any]], tail=None, split: int | None = None):
        self.parts = [TimedStage(cls, cfg, label) for label, cls, cfg in steps]
        self.tail = tail
        self.split = split      # with a tail: the block comes whole, the stages see batches of this size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.tail is None or not self.split:
            for part in self.parts:
                batch = part(batch)
            return self.tail(batch) if self.tail is not None else batch
        n = batch_len(batch)
        for start in range(0, n, self.split):     # the stages' batches; the writer gathers the block's rows
            sub = {k: v[start:start + self.split] for k, v in batch.items()}
            for part in self.parts:
                sub = part(sub)
            self.tail.add(sub)
        return self.tail.flush()


def chain_slots(job: JobPlan, steps: list[tuple[str, type[Stage], Any]], shape: Shape) -> int:
    """How many tasks of the pass's first task chain run at once: the CPUs the actor pools leave,
    over the chain's CPU request."""
    chain = [job.stages[label] for label, cls, _ in steps if not cls.stateful]
    cpus = max((r.num_cpus for r in chain), default=0.0)
    held = sum(r.num_cpus * r.concurrency for r in job.stages.values() if r.concurrency)
    return max(int((shape.cpus - held) // cpus), 1) if cpus > 0 else 1


def apply_chain(ds, steps: list[tuple[str, type[Stage], Any]], job: JobPlan, shape: Shape, tail=None):
    """Append consecutive task steps ``(label, class, config)`` as one ``map_batches``, with the
    largest CPU request ``job`` planned for them and the smallest batch size."""
    for _, cls, cfg in steps:
        check_resources(cls, shape.cpus, shape.gpus, cfg)
    plans = [job.stages[label] for label, _, _ in steps]
    size = min(r.batch_size for r in plans)
    # with the writer at its end the chain takes whole blocks (one fragment per block, ``FragmentWriter.add``)
    return ds.map_batches(TimedChain(steps, tail, split=size if tail is not None else None),
                          batch_size=None if tail is not None else size, batch_format="numpy",
                          num_cpus=max(r.num_cpus for r in plans), zero_copy_batch=False)


def from_blocks(blocks: list):
    """A dataset of Arrow tables, one block each."""
    import ray.data

    return ray.data.from_arrow(blocks)


def plan_blocks(source, method: str, pieces: list, args: tuple, log, num_cpus: float = 0.5) -> tuple[list, int]:
    """``getattr(source, method)(piece, *args)``, a generator of Arrow tables, for every piece as a
    Ray generator task: each table becomes an object of its own, made by the worker, so the driver
    holds refs and row counts, not the rows (``readers.StreamedParquet``). Returns (refs, rows)."""
    import ray
    from tqdm.auto import tqdm

    def blocks(src, piece, *a):
        for table in getattr(src, method)(piece, *a):
            yield table
            yield table.num_rows           # tiny: the driver learns the block's size without fetching it

    task = ray.remote(num_cpus=num_cpus, max_retries=2, num_returns="streaming")(blocks)
    src = ray.put(source)
    args = tuple(ray.put(a) if a is not None and not isinstance(a, (int, float, str)) else a for a in args)
    gens = [task.remote(src, piece, *args) for piece in pieces]
    refs: list = []
    rows = 0
    bar = tqdm(total=len(gens), desc="plan", unit="piece", file=log, disable=log is None)
    for gen in gens:
        for i, ref in enumerate(gen):
            if i % 2:
                rows += ray.get(ref)
            else:
                refs.append(ref)
        bar.update(1)
    bar.close()
    return refs, rows


def from_block_refs(refs: list):
    """A dataset of Arrow tables already in the object store (``plan_blocks``), one block each."""
    import ray.data

    return ray.data.from_arrow_refs(refs)


def iter_batches(ds):
    """Run the dataset; yields its output blocks as numpy batches."""
    return ds.iter_batches(batch_size=None, batch_format="numpy")


def map_tables(fn, items: list[dict]):
    """``fn(item)`` -> a pyarrow table, one Ray task per item (half a CPU each); yields the tables as
    they come. The training index runs one per shard."""
    import pyarrow as pa
    import ray.data

    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(lambda b: fn({k: v[0] for k, v in b.items()}), batch_size=1, batch_format="numpy",
                        num_cpus=0.5)
    for b in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield pa.Table.from_batches([b]) if isinstance(b, pa.RecordBatch) else b


def actor_pass(blocks: list, actor_cls, kwargs: dict, res: Resources):
    """Every block through one actor pool of ``actor_cls(**kwargs)`` (a model pass, e.g. the latent
    cache), planned by ``plan_pools`` like a curate model stage (room for a lost node included); yields
    each block's output batch."""
    from ray.data import ActorPoolStrategy

    res = plan_pools([("pass", res, True)], cluster_shape()).stages["pass"]
    ds = from_blocks(blocks).map_batches(actor_cls, batch_size=None, batch_format="numpy", zero_copy_batch=False,
                                         fn_constructor_kwargs=kwargs, compute=ActorPoolStrategy(size=res.concurrency),
                                         num_cpus=res.num_cpus, **({"num_gpus": res.num_gpus} if res.num_gpus else {}))
    yield from iter_batches(ds)


def apply_fn(ds, fn, *, num_cpus: float = 1.0, batch_size: int | None = None):
    """Append a plain function step (e.g. the fragment writer) as Ray tasks."""
    return ds.map_batches(fn, batch_size=batch_size, batch_format="numpy", num_cpus=num_cpus, zero_copy_batch=False)


def running_cluster() -> str | None:
    """The address of a cluster ``ray start`` runs on this machine (its GCS process alive), else None."""
    try:
        from ray._private.services import find_bootstrap_address, find_gcs_addresses

        found = find_bootstrap_address(None)
        return found if found and found in find_gcs_addresses() else None
    except Exception:  # noqa: BLE001 - a private helper that moved: behave as if none runs
        return None


def connect(address: str | None, num_cpus: int | None) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``, or the one ``ray start`` runs on this
    machine); only when there is none, start a local Ray of ``num_cpus``. Joining never passes
    ``num_cpus`` (Ray refuses it: the cluster's size is the cluster's)."""
    import logging

    import ray

    global CONNECT_SECONDS

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    if not ray.is_initialized():
        started = time.monotonic()
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=False)
        elif running_cluster():
            ray.init(log_to_driver=False)      # Ray finds it (and, as for any local cluster, its auth token)
        else:
            # Ray starts its workers at nice 15 (below its own daemons). On a machine whose every core
            # runs a stage, the driver's and raylet's wake-ups then preempt the workers at once:
            # the decode stage ran 8-12 % slower per image than in a plain process pool; at nice 0
            # the engine went from 0.76 to 0.83-0.87 of that pool (bench/curate_images.py). Only
            # for the local Ray started here (the raylet passes its environment to its workers); a
            # cluster's own `ray start` decides for itself. RAY_worker_niceness in the environment wins.
            os.environ.setdefault("RAY_worker_niceness", "0")
            ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False)
        CONNECT_SECONDS = time.monotonic() - started


# seconds the last ``connect`` of this process took to start or join Ray (0 when Ray was up already)
CONNECT_SECONDS = 0.0


def configure(no_progress_timeout_s: float, progress_bars: bool, has_actor_stages: bool = True) -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    # Per-operator reservations keep a downstream actor pool from starving; when every stage is a
    # task they all fuse into one operator and the reservation only idles half the CPUs
    # (measured: 0.72 -> 0.86 of the decode stage's standalone rate on 2 cores, bench/RESULTS.md).
    ctx.op_resource_reservation_enabled = has_actor_stages
    ctx.execution_no_progress_timeout_s = no_progress_timeout_s
    ctx.enable_progress_bars = progress_bars
    ctx.enable_operator_progress_bars = progress_bars


def run_tasks(fn, calls: list[tuple], desc: str, unit: str, log, num_cpus: float = 0.5, max_retries: int = 2) -> list:
    """Run ``fn(*args)`` for every tuple in ``calls`` as Ray tasks, with a progress bar on ``log``;
    returns the results in completion order. A failed task is retried, then raises."""
    import ray
    from tqdm.auto import tqdm

    task = ray.remote(num_cpus=num_cpus, max_retries=max_retries)(fn)
    refs = [task.remote(*args) for args in calls]
    bar = tqdm(total=len(refs), desc=desc, unit=unit, file=log, disable=log is None)
    results = []
    while refs:
        done, refs = ray.wait(refs, num_returns=1)
        results += ray.get(done)
        bar.update(len(done))
    bar.close()
    return results
