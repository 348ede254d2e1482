"""The Ray Data adapter: task stages, actor-pool stages on 2 CPUs (no hang), resource checks."""
import os
import time

import numpy as np
import pytest

from pipeline.adapter import (
    ResourceError,
    Shape,
    apply_stage,
    check_resources,
    plan_job,
)
from pipeline.contract.stage import Stage, active, column


class AddOne(Stage):
    name = "add_one_test"
    num_cpus = 1.0
    batch_size = 4

    def __call__(self, batch):
        batch["y"] = batch["x"] + 1
        return batch


class ModelStage(Stage):
    """Holds 'a model' built once per actor; counts how many times it was built."""
    name = "model_test"
    stateful = True
    num_cpus = 0.5
    batch_size = 8

    def __init__(self, config=None):
        super().__init__(config)
        import os
        self.pid = os.getpid()

    def __call__(self, batch):
        keep = active(batch)
        out = column(batch, "pid")
        for i in range(len(keep)):
            out[i] = self.pid
        return batch


class GpuStage(ModelStage):
    name = "gpu_test"
    num_gpus = 1.0


def test_pool_sizes_leave_a_cpu_for_reads_and_writes():
    two = plan_job([("add_one", AddOne, None), ("model", ModelStage, None)], Shape(2.0, 0.0, (2.0,))).stages
    assert two["model"].concurrency == 2             # 2 x 0.5 CPU
    assert two["add_one"].concurrency is None        # tasks
    assert plan_job([("gpu", GpuStage, None)], Shape(16.0, 4.0, (16.0,))).stages["gpu"].concurrency == 4


def test_gpu_request_without_gpu_fails_clearly():
    with pytest.raises(ResourceError, match="requests 1.0 GPU per worker but the Ray cluster has 0 GPUs"):
        check_resources(GpuStage, 2, 0)


def test_task_and_actor_stages_on_two_cpus(ray_local):
    import sys

    import ray.cloudpickle
    import ray.data

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])   # test classes travel by value

    ds = ray.data.from_items([{"x": i} for i in range(40)], override_num_blocks=5)
    plan = plan_job([("add_one", AddOne, None), ("model", ModelStage, None)], Shape(2.0, 0.0, (2.0,))).stages
    ds = apply_stage(ds, AddOne, None, "add_one", plan["add_one"], cluster_cpus=2)
    ds = apply_stage(ds, ModelStage, None, "model", plan["model"], cluster_cpus=2)
    rows = sorted(ds.take_all(), key=lambda r: r["x"])
    assert [r["y"] for r in rows] == list(range(1, 41))
    assert all(r["status"] == "kept" for r in rows)
    assert len({r["pid"] for r in rows}) <= 2                 # at most the 2 actors of the pool
    assert rows[0]["_time_model"] >= 0 and rows[0]["_time_add_one"] >= 0
    assert np.isclose(sum(r["_time_add_one"] for r in rows[:4]) / 4, rows[0]["_time_add_one"])


def test_task_steps_ask_for_no_more_cpu_than_some_node_must_have_free():
    from pipeline.adapter import task_cpu_cap

    assert task_cpu_cap(2.0, 1.0, 1) == 1.0           # one machine: the CPU size_pool leaves
    assert task_cpu_cap(2.0, 1.0, 2) == 0.5           # two 1-CPU nodes, actors spread over both
    assert task_cpu_cap(64.0, 48.0, 8) == 2.0         # eight 8-CPU nodes: 16 free, one node has 2
    assert task_cpu_cap(16.0, 32.0, 2) == 0.05        # over-subscribed by GPU actors: a token request


def test_plans_survive_losing_the_largest_node():
    """The job plan on shapes a user brings: on one machine nothing changes; on several nodes the
    actors' CPU requests shrink so that, with the largest node gone, the restarted actors leave a
    task step room on some node (``plan_job``)."""
    from pipeline.adapter import Shape, plan_job

    steps = [("load", AddOne, None), ("model", ModelStage, None), ("other", ModelStage, None)]

    def held_after(plan):
        return sum(plan.stages[s].num_cpus * plan.stages[s].concurrency for s in ("model", "other"))

    one = plan_job(steps, Shape(2.0, 0.0, (2.0,)))
    assert (one.task_cpus, one.stages["model"].num_cpus, one.stages["model"].concurrency) == (1.0, 0.5, 1)
    for nodes in [(1.0, 1.0), (1.0, 1.0, 1.0), (2.0, 2.0), (16.0, 8.0), (8.0,) * 8, (4.0, 1.0, 1.0)]:
        shape = Shape(sum(nodes), 0.0, nodes)
        plan = plan_job(steps, shape)
        left = shape.cpus - max(nodes)
        free_after = left - held_after(plan)
        assert free_after >= plan.task_cpus * 0.999, nodes       # a task fits on some surviving node
        assert free_after / (len(nodes) - 1) >= plan.task_cpus * 0.999, nodes
        assert plan.stages["load"].num_cpus == plan.task_cpus <= 1.0
    small = plan_job(steps, Shape(2.0, 0.0, (1.0, 1.0)))
    assert (small.task_cpus, small.stages["model"].num_cpus) == (0.5, 0.25)
    big = plan_job(steps, Shape(64.0, 0.0, (8.0,) * 8))
    assert (big.task_cpus, big.stages["model"].num_cpus, big.stages["model"].concurrency) == (1.0, 0.4375, 56)


@pytest.mark.slow
def test_curate_on_small_nodes_survives_losing_one(tmp_path, kill_debris):
    """A 0-CPU head and two 1-CPU nodes with three model stages (the shape that used to wait
    forever): an uninterrupted run, then the same run with one node removed (not gracefully) once
    the first rows are written. The second finishes with exactly the first's rows."""
    import threading

    import ray
    from PIL import Image
    from ray.cluster_utils import Cluster

    from pipeline.commands import curate, curate_spec
    from pipeline.contract import layout

    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    for i in range(96):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.jpg")
    (tmp_path / "img" / "bad.jpg").write_bytes(b"not an image")

    def spec(out):
        return curate_spec.parse({
            "input": {"path": str(tmp_path / "img")}, "output": {"path": str(tmp_path / out), "samples_per_shard": 20},
            "stages": ["decode", {"name": "clip", "model": "winnow-tiny-clip", "pretrained": "random"},
                       {"name": "aesthetic", "weights": "random"}, {"name": "ocr", "backend": "rapidocr"}],
            "ray": {"no_progress_timeout_s": 120, "progress_bars": False, "block_rows": 8}})

    was = ray.is_initialized()
    ray.shutdown()                                    # the session's local Ray gives way to the cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        whole = curate.run(spec("whole"), log=None)
        assert (whole.inputs, whole.kept, whole.rejected) == (97, 96, 1)

        rows_dir = tmp_path / "cut" / layout.WORK_DIR / "rows"
        seen = {}

        def fragments() -> int:
            try:
                return sum(f.endswith(".parquet") for _, _, fs in os.walk(rows_dir) for f in fs)
            except OSError:           # a folder the writer is renaming into right now
                return 0

        def remove_after_first_rows():
            while fragments() == 0:
                time.sleep(0.05)
            seen["fragments"] = fragments()
            cluster.remove_node(nodes[-1], allow_graceful=False)

        killer = threading.Thread(target=remove_after_first_rows, daemon=True)
        killer.start()
        cut = curate.run(spec("cut"), log=None)
        killer.join(timeout=30)
        assert 0 < seen.get("fragments", 0) < 13        # removed mid-run (13 blocks of 8 rows)
        deadline = time.time() + 60          # the GCS marks a killed node dead after its health checks fail
        while len([n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")]) != 1:
            assert time.time() < deadline, "the removed node is still alive"
            time.sleep(0.5)
        assert (cut.inputs, cut.kept, cut.rejected) == (97, 96, 1)
        cols = ["key", "status", "reject_reason", "clip_similarity", "aesthetic_score", "ocr_text"]
        a, b = (layout.read_annotations(str(tmp_path / d)).select(cols).to_pylist() for d in ("whole", "cut"))
        assert len({r["key"] for r in b}) == 97
        for ra, rb in zip(a, b, strict=True):
            assert {k: ra[k] for k in cols if k not in ("clip_similarity", "aesthetic_score")} == \
                   {k: rb[k] for k in cols if k not in ("clip_similarity", "aesthetic_score")}
            for k in ("clip_similarity", "aesthetic_score"):
                assert (ra[k] is None and rb[k] is None) or abs(ra[k] - rb[k]) < 1e-5
    finally:
        ray.shutdown()
        cluster.shutdown()
        if was:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)


def test_stage_metrics_are_ray_metrics_in_a_worker_and_nothing_outside(ray_local):
    import ray

    from pipeline.adapter import StageMetrics

    @ray.remote(num_cpus=0.5)
    def record():
        m = StageMetrics()
        m.record("decode", 10, 0.5, 300.0)
        m.record("decode", 6, 0.25, 310.0)
        return [type(x).__name__ for x in m._m], [x._name for x in m._m]

    kinds, names = ray.get(record.remote())
    assert kinds == ["Counter", "Counter", "Gauge"]
    assert names == ["winnow_stage_rows_total", "winnow_stage_seconds_total", "winnow_stage_worker_rss_mb"]


def test_a_large_plan_gets_larger_blocks_not_more_of_them(monkeypatch):
    import pyarrow as pa

    from pipeline.commands import curate

    table = pa.table({"key": [f"{i:06d}" for i in range(10_000)]})
    monkeypatch.setattr(curate, "MAX_BLOCKS", 100)
    blocks = curate._blocks(table, 32)
    assert len(blocks) == 100 and {b.num_rows for b in blocks} == {100}
    assert pa.concat_tables(blocks).column("key").to_pylist() == table.column("key").to_pylist()
    assert len(curate._blocks(table.slice(0, 1000), 32)) == 32          # small plans keep block_rows
    assert len(curate._blocks(table, 1, cap=False)) == 10_000           # a video's own block (fan-out)
    assert len(curate._blocks(table, 32, slots=3)) == 99                # capped, still a multiple of the slots


def test_blocks_fill_the_last_wave_of_tasks():
    """Every plan size, block size and number of task slots: the blocks cover the plan in order, none
    is larger than block_rows, sizes differ by at most one row, and their number is the smallest
    multiple of the slots that keeps them under block_rows (or one block per row, when rows are fewer)."""
    import math

    import pyarrow as pa

    from pipeline.commands import curate

    table = pa.table({"key": list(range(300))})
    for total in (0, 1, 2, 5, 31, 32, 33, 64, 65, 300):
        for rows in (1, 7, 32, 500):
            for slots in (1, 2, 3, 8):
                blocks = curate._blocks(table.slice(0, total), rows, slots=slots)
                sizes = [b.num_rows for b in blocks]
                assert sum(sizes) == total
                assert [k for b in blocks for k in b.column("key").to_pylist()] == list(range(total))
                if not total:
                    assert blocks == []
                    continue
                need = math.ceil(total / rows)              # blocks of at most `rows`
                want = min(math.ceil(need / slots) * slots, total)
                assert len(blocks) == want, (total, rows, slots)
                assert max(sizes) <= rows and max(sizes) - min(sizes) <= 1
    # 652 rows, blocks of 32, 2 workers: 22 blocks of 29-30 rows instead of 20 of 32 and one of 12
    sizes = [b.num_rows for b in curate._blocks(pa.table({"k": list(range(652))}), 32, slots=2)]
    assert len(sizes) == 22 and set(sizes) == {29, 30}


def test_chain_slots_are_the_cpus_the_actor_pools_leave():
    from pipeline import adapter
    from pipeline.commands import curate
    from pipeline.commands import curate_spec as specmod

    def slots(stages, cpus):
        spec = specmod.parse({"input": {"path": "/nonexistent"}, "output": {"path": "/nonexistent-out"},
                              "stages": stages})
        steps, shape = curate.steps_of(spec), adapter.Shape(float(cpus), 0.0, (float(cpus),))
        return adapter.chain_slots(adapter.plan_job(steps, shape), steps, shape)

    tasks = [{"name": "decode"}, {"name": "phash_dedup"}]
    assert [slots(tasks, c) for c in (1, 2, 8)] == [1, 2, 8]
    model = [{"name": "decode"}, {"name": "clip", "device": "cpu"}]
    assert [slots(model, c) for c in (2, 8)] == [1, 1]      # the CLIP pool holds all but one CPU
