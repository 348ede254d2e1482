"""What every model stage shares: device and pool settings, and turning them into resources."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pipeline.contract.config import option
from pipeline.contract.stage import Resources, Stage
from pipeline.models.device import pick_device


@dataclass
class ModelRuntime:
    """Runtime keys of a model stage. They change speed, not results (outside the fingerprint)."""

    device: Literal["auto", "cpu", "cuda"] = option(
        "auto", "auto = GPU actors when the Ray cluster has GPUs, else CPU; cuda fails before the run "
        "when the cluster has none", runtime=True)
    batch_size: int = option(32, "samples per model call", min=1, runtime=True)
    workers: int | None = option(None, "actor pool size; null = as many as the cluster's CPUs (or GPUs) allow",
                                 min=1, runtime=True)
    cpus_per_worker: float = option(1.0, "CPUs per actor (torch threads on CPU)", min=0.1, runtime=True)
    gpus_per_worker: float = option(1.0, "GPUs per actor on GPU (0.5 puts two actors on one GPU)", min=0.01,
                                    max=8, runtime=True)


def on_gpu(config: Any, cluster_gpus: float) -> bool:
    return config.device == "cuda" or (config.device == "auto" and cluster_gpus > 0)


def model_resources(config: Any, cluster_gpus: float, gpu_capable: bool = True) -> Resources:
    gpu = gpu_capable and on_gpu(config, cluster_gpus)
    return Resources(num_cpus=config.cpus_per_worker, num_gpus=config.gpus_per_worker if gpu else 0.0,
                     batch_size=config.batch_size, concurrency=config.workers)


def torch_device(config: Any) -> str:
    """The device inside an actor (``pipeline.models.device.pick_device``), torch's threads on CPU
    limited to the actor's CPU share."""
    return pick_device(config.device, round(config.cpus_per_worker))


class ModelStage(Stage):
    """A stage holding a model: an actor pool on CPU or GPU, per its ``ModelRuntime`` keys."""

    stateful = True
    after = ("decode|clips",)   # images, or a video run's clips (scored on their frames)

    @classmethod
    def gpu_capable(cls, config: Any) -> bool:
        return True

    @classmethod
    def resources(cls, config: Any, cluster_gpus: float = 0.0) -> Resources:
        return model_resources(config, cluster_gpus, gpu_capable=cls.gpu_capable(config))
