"""``winnow train``, the driver half: validate the spec, claim the output, build (or reuse) the shard
index with one Ray Data pass, check the bucket plan, fill the latent cache when asked, and run
``training.worker.train_loop`` on a ``TorchTrainer``.

Ray Train keeps the checkpoints under ``OUTPUT/ray/train`` and restores the newest when the same
output is run again (or when a worker group restarts within ``ray.max_failures``). The end of
the run exports ``OUTPUT/final``, a complete diffusers pipeline folder.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from pipeline import adapter
from pipeline.contract import layout, storage
from pipeline.contract.config import ConfigError, plural
from pipeline.contract.layout import TrainRun
from training.checkpoint import CheckpointError
from training.train_spec import TrainSpec
from training.worker import train_loop

NAME = "train"
DESCRIPTION = """\
Train SD 1.x/2.x or SDXL on curated shards as a Ray Train job.

  winnow train SPEC.yaml [--set dotted.key=value ...]

The spec names the shard sets (`winnow curate` outputs), the model (a diffusers pipeline folder,
or the tiny random preset), the objective, optimizer, EMA and Ray workers; see jobs/train_sd15.yaml
and jobs/train_sdxl.yaml. Running the same command on the same output.path resumes from the last
checkpoint, to the sample; the end of the run exports OUTPUT/final, a diffusers pipeline folder.
"""



@dataclass
class Plan:
    samples: int
    bucket_counts: dict[str, int]  # samples per bucket, by WxH
    global_batch: int
    steps_per_epoch: int
    starved: int                    # samples in buckets smaller than one global batch
    carried_per_epoch: int
    index_path: str = ""
    notes: list[str] = field(default_factory=list)
    index: object = field(default=None, repr=False)         # the pyarrow index the plan was made from
    buckets: list = field(default_factory=list, repr=False)    # its buckets ...
    bucket_of: object = field(default=None, repr=False)     # ... and every sample's bucket


def prepare_output(spec: TrainSpec) -> None:
    """Create the run folder, or check that it belongs to this same spec (resume)."""
    from pipeline.contract.layout import claim_output

    out = spec.output.path
    claim_output(
        out,
        TrainRun(out).spec,
        spec.fingerprint(),
        spec.to_dict(),
        spec.output.overwrite,
        "training run",
        "data, model, objective, optim, ema or train",
        list(TrainRun.ENTRIES),
        "train",
        {**{f"data.shards[{i}]": p for i, p in enumerate(spec.data.shards)}, "data.selection": spec.data.selection},
    )


def _caption_mix(spec: TrainSpec, index):
    """(index, notes): ``data.captions`` against the index: every weighted column empty is an error, some empty a
    note (their share falls back); a one-column mix is resolved into the index's caption here."""
    from training import captions

    if not spec.data.captions:
        return index, []
    weights = captions.normalise(spec.data.captions)
    missing = captions.CaptionMix.missing(index, weights)
    if len(missing) == len(weights):
        raise ConfigError(f"data.captions: no sample of {spec.data.shards} has text in {missing}; curate with a "
                          f"caption stage whose backends write them (caption_coca: coca, caption_vlm: vlm, "
                          f"caption_summary: summary), or weigh the source caption")
    notes = [f"data.captions: {', '.join(missing)} empty in every sample; its share falls back to "
             f"{' > '.join(spec.data.caption_fallback)}"] if missing else []
    if len(weights) == 1:
        index, counts = captions.resolve_static(index, weights, spec.data.caption_fallback, spec.train.seed)
        notes.append(f"captions: {next(iter(weights))} (samples per column: "
                     f"{', '.join(f'{c} {n}' for c, n in sorted(counts.items()))})")
    else:
        share = ", ".join(f"{c} {w / sum(weights.values()):.0%}" for c, w in weights.items())
        notes.append(f"captions: drawn per sample and epoch from {share}; the counts are in each checkpoint's cursor")
    return index, notes


def plan(spec: TrainSpec, log=sys.stderr) -> Plan:
    """Index the shard sets (one Ray Data pass, cached) and check the bucket plan."""
    from pipeline.contract.layout import atomic_write, table_bytes
    from training import families

    family = families.get(spec.model.kind)
    index = family.load_index(spec.data.shards, TrainRun(spec.output.path).index_work, log, spec.data.selection,
                              adapter.map_tables)
    index, caption_notes = _caption_mix(spec, index)
    held = 0
    if spec.train.eval_every:                           # the held-out slice: never trained on
        index, val = _split_validation(spec, index)
        held = val.num_rows
        if not held:
            raise ConfigError(
                f"train.eval_fraction: {spec.train.eval_fraction:g} of {index.num_rows} samples holds none "
                f"out for validation; raise it, or set train.eval_every: 0"
            )
    path = TrainRun(spec.output.path).index
    if not storage.exists(path) or not layout.read_table(path).equals(index):
        atomic_write(path, table_bytes(index))
    buckets, bucket_of, sizes, names = family.plan_buckets(spec, index)
    g = min(sizes)
    counts = np.bincount(bucket_of[bucket_of >= 0], minlength=len(buckets))
    steps = int(sum(c // s for c, s in zip(counts, sizes, strict=True)))
    starved = int(sum(c for c, s in zip(counts, sizes, strict=True) if c < s))
    p = Plan(index.num_rows, {names[i]: int(c) for i, c in enumerate(counts) if c}, g, steps, starved,
             int(sum(c % s for c, s in zip(counts, sizes, strict=True) if c >= s)), path,
             index=index, buckets=buckets, bucket_of=bucket_of)
    if held:
        p.notes.append(f"{held} samples held out for validation ({TrainRun.VAL_INDEX}; train.eval_fraction "
                       f"{spec.train.eval_fraction:g}, at most train.eval_max {spec.train.eval_max})")
    p.notes += caption_notes + family.prepare_run(spec, index, bucket_of)
    if steps == 0:
        raise ConfigError(f"train.batch_size x ray.num_workers = {g} is more than any bucket holds "
                          f"(largest: {counts.max()} of {index.num_rows} samples); lower the batch size or the "
                          f"worker count, or lower data.max_aspect so fewer, fuller buckets form")
    if starved:
        p.notes.append(f"{starved} samples sit in buckets smaller than one global batch ({g}) and are never trained "
                       f"on; lower train.batch_size or data.max_aspect")
    return p


def _split_validation(spec: TrainSpec, index):
    """(training rows, held-out rows); the held-out ones written to OUTPUT/val_index.parquet."""
    from pipeline.contract.layout import atomic_write, table_bytes
    from training.validate import holdout

    held = holdout(index.column("key").to_pylist(), spec.train.seed, spec.train.eval_fraction, spec.train.eval_max)
    val = index.filter(held)
    path = TrainRun(spec.output.path).val_index
    if not storage.exists(path) or not layout.read_table(path).equals(val):
        atomic_write(path, table_bytes(val))
    return index.filter(~held), val


def format_plan(spec: TrainSpec, p: Plan) -> str:
    from training import families

    size = families.get(spec.model.kind).describe_plan(spec, len(p.bucket_counts), p.global_batch)
    lines = [f"winnow train: {plural(p.samples, 'sample')}, {size}, "
             f"{plural(p.steps_per_epoch, 'step')} per epoch ({plural(p.carried_per_epoch, 'sample')} carried to the "
             f"next epoch)",
             "  buckets  " + ", ".join(f"{k}: {v}" for k, v in sorted(p.bucket_counts.items(), key=lambda kv: -kv[1]))]
    lines += [f"  note: {n}" for n in p.notes]
    return "\n".join(lines)


@dataclass
class TrainResult:
    output: str
    summary: dict
    metrics: list[dict]
    validation: list[dict] = field(default_factory=list)    # train.eval_every's records


def format_summary(r: TrainResult) -> str:
    s = r.summary
    losses = [m["loss"] for m in r.metrics]
    rates = [m["samples_per_s"] for m in r.metrics if m["step"] > s["resumed_from"]]
    waits = [m["data_wait"] for m in r.metrics if m["step"] > s["resumed_from"]]
    lines = [
        f"winnow train: {r.output}",
        f"  steps      {s['steps']} ({s['steps_this_run']} this run"
        + (f", resumed from step {s['resumed_from']})" if s["resumed_from"] else ")"),
        f"  epoch      {s['epoch']}   global batch {s['global_batch']} on {plural(s['world_size'], 'worker')}",
        f"  loss       first logged {losses[0]:.4f}, last {losses[-1]:.4f}" if losses else "  loss       (none logged)",
        f"  throughput {np.mean(rates):.1f} samples/s, data wait {100 * np.mean(waits):.1f} % of step time"
        if rates
        else "  throughput (no steps this run)",
        f"  wall       {s['wall_s']:.1f} s in the workers",
        *(
            [
                f"  lora       {s['lora']}/pytorch_lora_weights.safetensors  ({s['adapter_parameters']:,} "
                f"parameters{', EMA weights' if s['ema'] else ''}; base {s['base']})"
            ]
            if s.get("lora")
            else []
        ),
        *(
            [
                f"  final      {s['final']}  (diffusers pipeline{', EMA weights' if s['ema'] else ''}"
                f"{', adapter fused' if s.get('lora') else ''})"
            ]
            if s.get("final")
            else []
        ),
        f"  logs       tensorboard --logdir {storage.join(r.output, 'tensorboard')}",
    ]
    if r.validation:
        v = r.validation
        clip = f"; CLIP score of the samples {v[0]['val_clip_score']:.2f} -> {v[-1]['val_clip_score']:.2f}" \
            if v[-1].get("val_clip_score") is not None else ""
        lines.append(f"  validation loss {v[0]['val_loss']:.4f} (step {v[0]['step']}) -> {v[-1]['val_loss']:.4f} (step "
                     f"{v[-1]['step']}) on {v[-1]['val_samples']} held-out samples{clip}")
    if s.get("samples"):
        lines.append(f"  samples    {', '.join(s['samples'])}")
    lines[1:1] = [f"  warning: {w}" for w in s.get("warnings") or []]
    return "\n".join(lines)


def init_ray(spec: TrainSpec):
    adapter.connect(spec.ray.address, spec.ray.num_cpus)
    adapter.configure(no_progress_timeout_s=900, progress_bars=False, has_actor_stages=spec.data.cache)


class _ProgressBar:
    """The driver's view of a running job: a bar to ``max_steps`` with the loss and samples/s, read
    from rank 0's ``metrics.jsonl`` (the workers' own output goes to Ray's logs)."""

    def __init__(self, path: str, total: int, log, every_s: float = 1.0):
        import threading

        from tqdm.auto import tqdm

        self.path, self.every_s = path, every_s
        self.offset = (
            len(self._read(0)) if storage.is_url(path) else (os.path.getsize(path) if os.path.exists(path) else 0)
        )
        self.bar = tqdm(total=total, desc="train", unit="step", file=log, disable=log is None, dynamic_ncols=True)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _read(self, offset: int) -> bytes:
        """metrics.jsonl from ``offset`` (on a store the whole object, which rank 0 rewrites at checkpoints)."""
        try:
            if storage.is_url(self.path):
                return storage.read_bytes(self.path)[offset:]
            with open(self.path, "rb") as fh:
                fh.seek(offset)
                return fh.read()
        except OSError:
            return b""

    def _poll(self) -> None:
        lines = self._read(self.offset).decode("utf-8", "replace").splitlines(keepends=True)
        for line in lines:
            if not line.endswith("\n"):
                break                                       # a line rank 0 is still writing
            self.offset += len(line.encode("utf-8"))
            try:
                m = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "loss" not in m:
                continue                                    # a validation record
            self.bar.n = int(m.get("step", self.bar.n))
            self.bar.set_postfix(loss=f"{m.get('loss', float('nan')):.4f}",
                                 samples_s=f"{m.get('samples_per_s', 0):.1f}", refresh=False)
            self.bar.refresh()

    def _loop(self) -> None:
        while not self.stop.wait(self.every_s):
            self._poll()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self._poll()
        self.bar.close()


def run(spec: TrainSpec, log=sys.stderr) -> TrainResult:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    prepare_output(spec)
    init_ray(spec)
    p = plan(spec, log)
    if log:
        print(format_plan(spec, p), file=log, flush=True)
    cache_dir = ""
    if spec.data.cache:
        from training.cache import build_cache

        started = time.time()
        import ray

        gpu = spec.ray.use_gpu and ray.cluster_resources().get("GPU", 0) >= 1
        cache_dir = build_cache(spec, p.index, p.buckets, p.bucket_of, adapter.actor_pass, gpu, log)
        if log:
            print(f"latent cache: {p.samples} samples in {cache_dir} ({time.time() - started:.1f} s)", file=log)
    out = storage.absolute(spec.output.path)
    resources = {"CPU": spec.ray.cpus_per_worker}
    # checkpoints go where the run's output is: Ray Train persists them itself (through the store's
    # filesystem when the output is a URL), so a worker on any node resumes from them
    ray_fs, ray_path = storage.arrow_filesystem(TrainRun(out).ray)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"spec": spec.to_dict(), "output": out, "index_path": storage.absolute(p.index_path),
                           "cache_dir": cache_dir,
                           "val_index_path": TrainRun(out).val_index if spec.train.eval_every else "",
                           "fingerprint": spec.fingerprint()},
        scaling_config=ScalingConfig(num_workers=(spec.ray.num_workers if spec.ray.min_workers is None
                                                  else (spec.ray.min_workers, spec.ray.num_workers)),
                                     use_gpu=spec.ray.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=TrainRun.RAY_RUN, storage_path=ray_path,
                             storage_filesystem=ray_fs if storage.is_url(out) else None,
                             failure_config=FailureConfig(max_failures=spec.ray.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=spec.train.keep_checkpoints)))
    check_ray_snapshot(TrainRun(out).checkpoints)
    progress = _ProgressBar(TrainRun(out).metrics, spec.train.max_steps, log)
    try:
        trainer.fit()
    except Exception as exc:  # noqa: BLE001 - a refused checkpoint is the user's to fix: say which file
        import re

        found = re.findall(r"CheckpointError: ([^\n]+)", str(exc))     # the worker's own error line
        if found:
            raise CheckpointError(found[-1]) from None
        if type(exc).__name__ == "CheckpointManagerInitializationError":    # Ray's own list refused it
            raise CheckpointError(f"{storage.join(TrainRun(out).checkpoints, 'checkpoint_manager_snapshot.json')}: "
                                  f"not a valid checkpoint file ({str(exc).splitlines()[0][:200]})") from None
        raise
    finally:
        progress.close()
    return read_result(out)


def check_ray_snapshot(folder: str) -> None:
    """Ray Train's list of a run's checkpoints (``checkpoint_manager_snapshot.json``), read by Ray in
    the driver when the run resumes: damaged (junk, truncated, not UTF-8), Ray stops with a traceback,
    so it is read here first and refused with a ``CheckpointError`` naming it."""
    from training.checkpoint import load_json

    path = storage.join(folder, "checkpoint_manager_snapshot.json")
    if not storage.exists(path):
        return
    if storage.is_url(path):
        with storage.scratch() as d:
            doc = load_json(storage.download(path, os.path.join(d, "checkpoint_manager_snapshot.json")))
    else:
        doc = load_json(path)
    if not isinstance(doc, dict) or "ray_version" not in doc or not isinstance(doc.get("checkpoint_results"), list):
        raise CheckpointError(f"{path}: not a valid checkpoint file (Ray Train's list of this run's checkpoints, "
                              f"without its ray_version and checkpoint_results); restore it, or remove it to start "
                              f"the run again from step 0")


def read_result(out: str) -> TrainResult:
    """A finished run's summary and metrics (the last record of every step)."""
    summary = json.loads(storage.read_bytes(TrainRun(out).summary))
    metrics = [json.loads(line) for line in storage.read_bytes(TrainRun(out).metrics).splitlines() if line]
    # a killed run logs steps it never checkpointed; keep the last record of every step
    by_step = {m["step"]: m for m in metrics if "loss" in m}
    val_by_step = {m["step"]: m for m in metrics if "val_loss" in m}
    return TrainResult(out, summary, [by_step[k] for k in sorted(by_step)],
                       [val_by_step[k] for k in sorted(val_by_step)])


def arguments(parser) -> None:
    from pipeline.commands import add_set_argument

    parser.add_argument("spec", help="train spec YAML (see jobs/train_sd15.yaml)")
    add_set_argument(parser, "train.max_steps=500")


def from_args(args) -> TrainSpec:
    from training import train_spec

    return train_spec.load(args.spec, args.set)


__all__ = ["Plan", "TrainResult", "format_plan", "format_summary", "plan", "prepare_output", "run"]
