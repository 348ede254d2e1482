"""The Ray Data adapter: task stages, actor-pool stages on 2 CPUs (no hang), resource checks."""
import numpy as np
import pytest

from pipeline.adapter import (
    ResourceError,
    apply_stage,
    check_resources,
    plan_resources,
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
    assert plan_resources(ModelStage, None, cluster_cpus=2, cluster_gpus=0).concurrency == 2   # 2 x 0.5 CPU
    assert plan_resources(AddOne, None, cluster_cpus=2, cluster_gpus=0).concurrency is None    # tasks
    assert plan_resources(GpuStage, None, cluster_cpus=16, cluster_gpus=4).concurrency == 4


def test_gpu_request_without_gpu_fails_clearly():
    with pytest.raises(ResourceError, match="requests 1.0 GPU per worker but the Ray cluster has 0 GPUs"):
        check_resources(GpuStage, 2, 0)


def test_task_and_actor_stages_on_two_cpus(ray_local):
    import sys

    import ray.cloudpickle
    import ray.data

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])   # test classes travel by value

    ds = ray.data.from_items([{"x": i} for i in range(40)], override_num_blocks=5)
    ds = apply_stage(ds, AddOne, None, "add_one", cluster_cpus=2)
    ds = apply_stage(ds, ModelStage, None, "model", cluster_cpus=2)
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


@pytest.mark.slow
def test_model_stages_run_on_many_small_nodes(tmp_path):
    """A 0-CPU head and two 1-CPU nodes (the shape that used to wait forever): two model-stage actor
    pools and the task steps all find room."""
    import ray
    from PIL import Image
    from ray.cluster_utils import Cluster

    from pipeline.commands import curate, curate_spec

    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    for i in range(24):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.jpg")
    was = ray.is_initialized()
    ray.shutdown()                                    # the session's local Ray gives way to the cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        spec = curate_spec.parse({"input": {"path": str(tmp_path / "img")}, "output": {"path": str(tmp_path / "out")},
                                  "stages": ["decode", {"name": "clip", "model": "winnow-tiny-clip", "pretrained": "random"},
                                             {"name": "aesthetic", "weights": "random"}, {"name": "ocr", "backend": "rapidocr"}],
                                  "ray": {"no_progress_timeout_s": 120, "progress_bars": False}})
        result = curate.run(spec, log=None)
        assert (result.inputs, result.kept, result.rejected) == (24, 24, 0)
    finally:
        ray.shutdown()
        cluster.shutdown()
        if was:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
