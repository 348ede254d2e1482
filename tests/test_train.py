"""Index, loader, models and the Ray Train trainer on a small curated shard set."""
from __future__ import annotations

import glob
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.contract.config import ConfigError
from tests.helpers import kill_at_checkpoint, kill_marked, killable_env, run_curate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def shards(ray_local, corpus, tmp_path_factory):
    root, expected = corpus
    out = str(tmp_path_factory.mktemp("train_shards") / "run")
    result = run_curate(root, out, samples_per_shard=8)
    return out, result.kept


def train_spec(shards_dir: str, out: str, **sections) -> dict:
    spec = {"data": {"shards": [shards_dir], "resolution": 96, "bucket_step": 32, "max_aspect": 2.0, "workers": 2},
            "model": {"kind": "sd"},
            "train": {"batch_size": 2, "max_steps": 6, "checkpoint_every": 3, "log_every": 1,
                      "sample_prompts": ["a photo"], "sample_steps": 2},
            "ray": {"num_workers": 2, "num_cpus": 2},
            "output": {"path": out}}
    for k, v in sections.items():
        spec.setdefault(k, {}).update(v)
    return spec


# ---- tokenizer ----

def test_offline_tokenizer_matches_open_clip(tmp_path):
    import open_clip

    from training.families.base import offline_clip_tokenizer

    tok = offline_clip_tokenizer(str(tmp_path / "tok"))
    ref = open_clip.get_tokenizer("ViT-B-32")
    captions = ["a photo of a cat", "Crème brûlée, 3 spoons!", ""]
    ids = tok(captions, padding="max_length", max_length=77, truncation=True).input_ids
    for caption, row in zip(captions, ids, strict=True):
        want = ref([caption])[0].tolist()
        n = want.index(49407) + 1
        assert row[:n] == want[:n]
        assert row[n:] == [49407] * (77 - n)          # SD pads with <|endoftext|>
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


# ---- index and loader ----

def test_index_reads_every_kept_image_by_offset(ray_local, shards, tmp_path):
    from training.index import INDEX_FILE, build_index

    out, kept = shards
    index, where = build_index(out, str(tmp_path))
    assert index.num_rows == kept == 46       # 40 images + 6 odd ones (CMYK, 16-bit, alpha, ...)
    assert where == os.path.join(out, INDEX_FILE)
    for row in index.to_pylist()[::7]:
        with tarfile.open(row["shard"]) as tf:
            data = tf.extractfile(f"{row['key']}.{row['ext']}").read()
        with open(row["shard"], "rb") as fh:
            fh.seek(row["offset"])
            assert fh.read(row["size"]) == data
        with Image.open(io.BytesIO(data)) as im:
            assert im.size == (row["width"], row["height"])
    mtime = os.path.getmtime(where)
    again, _ = build_index(out, str(tmp_path))
    assert again.equals(index) and os.path.getmtime(where) == mtime     # cached, not rebuilt


def test_index_strings_read_by_row_without_a_list():
    """The loader's view of the index's string columns: shard paths as codes into their distinct
    values (chunks with different dictionaries, nulls), captions and keys from the Arrow array; each
    row reads back exactly what the column holds."""
    import pyarrow as pa

    from training.index import Strings

    shard = pa.chunked_array([["s/b.tar", "s/a.tar", "s/b.tar"], ["s/c.tar", "s/a.tar"]])
    paths = Strings(shard, dictionary=True)
    assert [paths[i] for i in range(len(paths))] == shard.to_pylist()
    assert paths.distinct() == ["s/b.tar", "s/a.tar", "s/c.tar"] and paths.codes.dtype == np.int32
    caption = pa.chunked_array([["a cat", None], ["", "ünïcode 字"]])
    text = Strings(caption)
    assert [text[np.int64(i)] for i in range(4)] == ["a cat", None, "", "ünïcode 字"] and len(text) == 4


def test_index_rebuilds_when_shards_change(ray_local, shards, tmp_path):
    import shutil

    from training.index import build_index

    out, _ = shards
    copy = str(tmp_path / "copy")
    shutil.copytree(os.path.join(out, "shards"), os.path.join(copy, "shards"))
    first, _ = build_index(copy, str(tmp_path))
    last = sorted(glob.glob(os.path.join(copy, "shards", "*.tar")))[-1]
    os.remove(last)
    second, _ = build_index(copy, str(tmp_path))
    assert second.num_rows == first.num_rows - sum(1 for s in first.column("shard").to_pylist() if s == last)


class _AddTimeFields:      # what StableDiffusionXLPipeline._get_add_time_ids reads of a pipeline
    class unet:
        class config:
            addition_time_embed_dim = 8

        class add_embedding:
            class linear_1:
                in_features = 8 * 6 + 32


def test_loader_batches_follow_the_schedule_and_resume_exactly(ray_local, shards, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from training.index import bucket_ids, build_index
    from training.loader import BucketLoader
    from training.schedule import Cursor

    index, _ = build_index(shards[0], str(tmp_path))
    table, bucket_of = bucket_ids(index, 96, 32, 2.0)
    assert [(b.width, b.height) for b in table] == [(64, 128), (96, 96), (128, 64)]

    def take(cursor, rank, n):
        loader = BucketLoader(index, table, bucket_of, cursor, batch_size=2, rank=rank, world_size=2, seed=3, workers=2)
        out = []
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                break
        loader.close()
        return out, loader.state()

    r0, state = take(Cursor(), 0, 5)
    r1, _ = take(Cursor(), 1, 5)
    for a, b in zip(r0, r1, strict=True):
        assert a.bucket == b.bucket and not set(a.ids) & set(b.ids)      # same bucket, disjoint samples
        bucket = table[a.bucket]
        assert a.pixels.shape == (2, 3, bucket.height, bucket.width)
        assert -1.0 <= float(a.pixels.min()) and float(a.pixels.max()) <= 1.0
        assert a.time_ids[:, 4:].tolist() == [[bucket.height, bucket.width]] * 2
        # the loader's SDXL time ids are what diffusers' pipeline builds from (original, crop, target)
        for i, row in zip(a.ids, a.time_ids.tolist(), strict=True):
            orig = (index.column("height")[i].as_py(), index.column("width")[i].as_py())
            want = StableDiffusionXLPipeline._get_add_time_ids(
                _AddTimeFields, orig, tuple(int(v) for v in row[2:4]), (bucket.height, bucket.width), torch.float32, 32)
            assert [row] == want.tolist()
    assert state.segments == [[4, 5]]
    first3, mid = take(Cursor(), 0, 3)
    rest, _ = take(mid, 0, 2)
    for a, b in zip(first3 + rest, r0, strict=True):                                  # stop at 3, resume: same batches
        assert a.ids == b.ids and torch.equal(a.pixels, b.pixels) and torch.equal(a.time_ids, b.time_ids)


def test_random_crop_keeps_the_bucket_size_and_records_its_corner():
    from training.buckets import Bucket
    from training.loader import load_image

    img = Image.fromarray(np.tile(np.arange(300, dtype=np.uint8)[None, :, None] % 251, (200, 1, 3)))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    bucket = Bucket(96, 96)
    pixels, (h, w, top, left) = load_image(buf.getvalue(), bucket, np.random.default_rng(0))
    assert pixels.shape == (96, 96, 3) and (h, w) == (200, 300) and top == 0
    assert 0 <= left <= 144 - 96                   # covering resize is 144x96
    centre, (_, _, ctop, cleft) = load_image(buf.getvalue(), bucket, None)
    assert (ctop, cleft) == (0, 24)


# ---- spec validation (before Ray starts) ----

def test_train_spec_errors_name_the_key(shards, tmp_path):
    from training import train_spec as trainspec

    out = str(tmp_path / "o")
    cases = [
        (train_spec("/nope", out), "data.shards: '/nope' does not exist"),
        (train_spec(shards[0], out, data={"resolution": 100}), "data.resolution: 100 is not a multiple"),
        (train_spec(shards[0], out, train={"mixed_precision": "fp16"}), "fp16 needs GPUs"),
        (train_spec(shards[0], out, model={"kind": "sdx"}), "did you mean 'sdxl'"),
        (train_spec(shards[0], out, optim={"lr": -1}), "optim.lr: -1.0 is below the minimum"),
        (train_spec(shards[0], out, model={"pretrained": str(tmp_path)}), "has no model_index.json"),
        (train_spec(shards[0], out, ray={"min_workers": 3, "max_failures": 1}), "ray.min_workers: 3 is more than"),
        (train_spec(shards[0], out, ray={"min_workers": 1}), "set ray.max_failures to at least 1"),
    ]
    for data, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            trainspec.parse(data)
    sd_dir = tmp_path / "sd15"
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (sd_dir / sub).mkdir(parents=True)
    (sd_dir / "model_index.json").write_text("{}")
    with pytest.raises(ConfigError, match="lacks text_encoder_2, tokenizer_2/"):
        trainspec.parse(train_spec(shards[0], out, model={"kind": "sdxl", "pretrained": str(sd_dir)}))


def test_a_global_batch_larger_than_every_bucket_fails_in_the_plan(ray_local, shards, tmp_path):
    from pipeline.commands import train as trainer
    from training import train_spec as trainspec

    spec = trainspec.parse(train_spec(shards[0], str(tmp_path / "o"), train={"batch_size": 32}))
    trainer.prepare_output(spec)
    with pytest.raises(ConfigError, match="global batch|more than any bucket holds"):
        trainer.plan(spec, log=None)


def test_jobs_train_specs_parse(shards):
    from training import train_spec as trainspec

    for f in sorted(glob.glob(os.path.join(ROOT, "jobs", "train_*.yaml"))):
        spec = trainspec.load(f, [f"data.shards=[{shards[0]}]"])
        assert spec.model.pretrained is None and spec.ray.num_workers == 2


# ---- training on Ray Train ----

def _losses(out: str) -> dict[int, float]:
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return {m["step"]: m["loss"] for m in map(json.loads, fh)}


def _unet(out: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(out, "final", "unet", "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def sd_run(ray_local, shards, tmp_path_factory):
    """An uninterrupted 2-worker run of tiny SD, 12 steps."""
    from pipeline.commands import train as trainer
    from training import train_spec as trainspec

    out = str(tmp_path_factory.mktemp("sd") / "run")
    spec = trainspec.parse(train_spec(shards[0], out, train={"max_steps": 12}))
    return out, trainer.run(spec, log=None)


def test_two_worker_sd_run_exports_a_loadable_pipeline(sd_run):
    from diffusers import StableDiffusionPipeline

    out, result = sd_run
    s = result.summary
    assert (s["steps"], s["world_size"], s["global_batch"], s["num_processes"]) == (12, 2, 4, 2)
    assert s["distributed"] == "DistributedType.MULTI_CPU"
    assert s["warnings"] == ["model.pretrained is null: the tiny sd preset with random weights (tests and the demo); "
                             "give a diffusers folder or hub id to train a real model"]
    from pipeline.commands.train import format_summary

    text = format_summary(result).splitlines()
    assert text[1].startswith("  warning: model.pretrained is null") and "on 2 workers" in "\n".join(text)
    assert [m["step"] for m in result.metrics] == list(range(1, 13))
    assert all(np.isfinite(m["loss"]) and m["samples_per_s"] > 0 and 0 <= m["data_wait"] <= 1 for m in result.metrics)
    ckpts = sorted(os.listdir(os.path.join(out, "ray", "train")))
    assert [c for c in ckpts if c.startswith("checkpoint_0")] == ["checkpoint_0000009", "checkpoint_0000012"]
    ck = os.path.join(out, "ray", "train", "checkpoint_0000012")
    assert {"unet", "ema_unet", "state.json", "state.safetensors", "cursor.json", "meta.json"} <= set(os.listdir(ck))
    index = pq.read_table(os.path.join(out, "index.parquet"))
    from training.index import bucket_ids
    per_epoch = int(sum(c // 4 for c in np.bincount(bucket_ids(index, 96, 32, 2.0)[1])))
    cursor = json.load(open(os.path.join(ck, "cursor.json")))
    assert (cursor["epoch"], cursor["segments"]) == (12 // per_epoch, [[4, 12 % per_epoch]])
    assert s["epoch"] == 12 // per_epoch
    assert glob.glob(os.path.join(out, "tensorboard", "events.out.tfevents.*"))
    assert os.path.exists(os.path.join(out, "samples", "step0000012_0.png"))
    pipe = StableDiffusionPipeline.from_pretrained(os.path.join(out, "final"))
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


@pytest.mark.slow
def test_kill9_then_rerun_trains_the_same_steps(sd_run, shards, tmp_path):
    """SIGKILL the driver (and its Ray) after the first checkpoint; the rerun resumes from the last
    checkpoint and every later step's loss and the final weights equal the uninterrupted run."""
    import yaml

    clean_out, _ = sd_run
    out = str(tmp_path / "run")
    spec_path = str(tmp_path / "spec.yaml")
    with open(spec_path, "w") as fh:
        yaml.safe_dump(train_spec(shards[0], out, train={"max_steps": 12}), fh)
    cmd = [sys.executable, "-m", "pipeline.cli", "train", spec_path]
    env = killable_env(ROOT)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_at_checkpoint(proc, out, 3)       # Ray has recorded the step-3 checkpoint as a result of the run
    assert not os.path.exists(os.path.join(out, "final"))
    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["resumed_from"] in (3, 6, 9) and summary["steps"] == 12
    assert f"resumed from step {summary['resumed_from']}" in rerun.stdout
    clean, resumed = _losses(clean_out), _losses(out)
    assert resumed == clean                               # every step, before and after the kill
    a, b = _unet(clean_out), _unet(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_worker_sdxl_run_and_world_size_change(ray_local, shards, tmp_path):
    """Tiny SDXL (two text encoders, micro-conditioning, v-prediction, offset noise, min-SNR) on 2
    workers, then resumed on 1 worker: the schedule remaps the rest of the epoch."""
    from diffusers import StableDiffusionXLPipeline

    from pipeline.commands import train as trainer
    from training import train_spec as trainspec

    out = str(tmp_path / "run")
    data = train_spec(shards[0], out, model={"kind": "sdxl"},
                      train={"max_steps": 4, "checkpoint_every": 2, "mixed_precision": "bf16",
                             "gradient_checkpointing": True, "sample_every": 2},
                      optim={"warmup_steps": 2},
                      objective={"prediction_type": "v_prediction", "offset_noise": 0.05, "min_snr_gamma": 5.0})
    first = trainer.run(trainspec.parse(data), log=None)
    assert (first.summary["steps"], first.summary["kind"], first.summary["prediction_type"]) == (
        4,
        "sdxl",
        "v_prediction",
    )
    assert [m["lr"] for m in first.metrics] == [5e-5, 1e-4, 1e-4, 1e-4]          # linear warm-up
    assert os.path.exists(os.path.join(out, "samples", "step0000002_0.png"))
    data["ray"]["num_workers"] = 1
    data["train"].update(max_steps=7, mixed_precision="no", gradient_checkpointing=False, sample_every=0)
    second = trainer.run(trainspec.parse(data), log=None)
    assert (second.summary["resumed_from"], second.summary["steps"], second.summary["world_size"]) == (4, 7, 1)
    cursor = json.load(open(os.path.join(out, "ray", "train", "checkpoint_0000007", "cursor.json")))
    assert cursor["segments"] == [[4, 4], [2, 3]]
    pipe = StableDiffusionXLPipeline.from_pretrained(os.path.join(out, "final"))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.text_encoder_2.dtype == pipe.vae.dtype == torch.float32
    image = pipe("a photo", num_inference_steps=2, height=64, width=96, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 96, 3) and np.isfinite(image).all()


def test_index_parquet_is_what_the_workers_read(sd_run, shards):
    out, _ = sd_run
    assert pq.read_table(os.path.join(out, "index.parquet")).num_rows == shards[1]


@pytest.mark.slow
def test_latent_cache_trains_like_decoding_and_is_reused(ray_local, shards, tmp_path):
    """data.cache: one Ray Data pass fills memory-mapped latents and text embeddings; a cached run's
    losses match an uncached centre-crop run's to float16 rounding; a second run reuses the cache."""
    from pipeline.commands import train as trainer
    from training import train_spec as trainspec

    def run(name, cache):
        data = train_spec(shards[0], str(tmp_path / name), data={"cache": cache, "random_crop": False},
                          train={"max_steps": 3, "checkpoint_every": 3, "sample_prompts": []},
                          objective={"caption_dropout": 0.5})
        return trainer.run(trainspec.parse(data), log=None)

    plain, cached = run("plain", False), run("cached", True)
    folders = glob.glob(str(tmp_path / "cached" / "cache" / "*"))
    assert len(folders) == 1
    done = json.load(open(os.path.join(folders[0], "done.json")))
    assert done == {"samples": shards[1], "latent_channels": 4, "context": 32, "pooled": 0, "tokens": 77}
    lat = np.load(os.path.join(folders[0], "latents_96x96.npy"), mmap_mode="r")
    assert lat.shape[1:] == (2, 4, 12, 12) and float(np.abs(lat[:, 1]).min()) > 0      # every row written
    a = [m["loss"] for m in plain.metrics]
    b = [m["loss"] for m in cached.metrics]
    assert len(a) == len(b) == 3 and np.allclose(a, b, rtol=0, atol=2e-3) and a != b
    mtime = os.path.getmtime(os.path.join(folders[0], "done.json"))
    data = train_spec(shards[0], str(tmp_path / "cached"), data={"cache": True, "random_crop": False},
                      train={"max_steps": 4, "checkpoint_every": 3, "sample_prompts": []},
                      objective={"caption_dropout": 0.5})
    again = trainer.run(trainspec.parse(data), log=None)
    assert again.summary["resumed_from"] == 3 and os.path.getmtime(os.path.join(folders[0], "done.json")) == mtime


def _cmdline(proc) -> list[str]:
    import psutil

    try:
        return proc.cmdline()
    except psutil.Error:          # gone or not ours: not one of this run's workers
        return []


@pytest.mark.slow
def test_a_killed_worker_restarts_from_the_last_checkpoint(sd_run, shards, tmp_path, kill_debris):
    """Ray Train's failure handling: SIGKILL one training worker mid-run; with ray.max_failures=1
    the worker group restarts from the newest checkpoint and the run ends as the clean one did."""
    import threading

    import psutil

    from pipeline.commands import train as trainer
    from training import train_spec as trainspec

    clean_out, _ = sd_run
    out = str(tmp_path / "run")
    spec = trainspec.parse(train_spec(shards[0], out, train={"max_steps": 12}, ray={"max_failures": 1}))
    result = {}
    thread = threading.Thread(target=lambda: result.update(r=trainer.run(spec, log=None)))
    thread.start()
    snapshot = os.path.join(out, "ray", "train", "checkpoint_manager_snapshot.json")
    deadline = time.time() + 240
    while not (os.path.exists(snapshot) and "checkpoint_0000003" in open(snapshot).read()):
        assert thread.is_alive() and time.time() < deadline
        time.sleep(0.01)
    # This run's workers only: the local Ray this process started forks them, so they are its
    # descendants (a machine-wide count also sees another suite's workers on a shared box).
    workers = sorted(p.pid for p in psutil.Process().children(recursive=True)
                     if "ray::RayTrainWorker" in " ".join(_cmdline(p)))
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)
    thread.join(timeout=300)
    summary = result["r"].summary
    assert summary["steps"] == 12 and summary["resumed_from"] in (3, 6, 9)
    assert _losses(out) == _losses(clean_out)
    a, b = _unet(clean_out), _unet(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_driver_shows_a_progress_bar_with_loss_and_throughput(tmp_path):
    """The driver reads rank 0's metrics.jsonl while the job runs; lines from an earlier run and a
    line still being written are skipped."""
    import io as _io

    from pipeline.commands.train import _ProgressBar

    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 4, "loss": 9.0, "samples_per_s": 1.0}) + "\n")   # a previous run
    log = _io.StringIO()
    bar = _ProgressBar(str(path), total=12, log=log, every_s=0.05)
    with open(path, "a") as fh:
        fh.write(json.dumps({"step": 6, "loss": 0.25, "samples_per_s": 3.5}) + "\n")
        fh.write(json.dumps({"step": 12, "loss": 0.125, "samples_per_s": 4.0}) + "\n")
        fh.write('{"step": 13, "lo')                               # rank 0 mid-write
    bar.close()
    text = log.getvalue()
    assert "12/12" in text and "loss=0.1250" in text and "samples_s=4.0" in text and "loss=9.0000" not in text


@pytest.mark.slow
def test_resuming_from_a_planted_checkpoint_runs_no_code_and_names_the_file(ray_local, shards, tmp_path, capsys):
    """A pickle planted in a real run's newest checkpoint: the resumed job refuses it, naming the file,
    and the payload never runs (the old trainer unpickled state.pt here)."""
    import pickle

    from pipeline.commands import train as trainer
    from training import train_spec as trainspec
    from training.checkpoint import CheckpointError

    out = str(tmp_path / "run")
    data = train_spec(shards[0], out, train={"max_steps": 3, "sample_prompts": []}, ray={"num_workers": 1})
    trainer.run(trainspec.parse(data), log=None)
    marker = str(tmp_path / "pwned")

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (marker,))

    ckpt = os.path.join(out, "ray", "train", "checkpoint_0000003")
    for name in ("state.safetensors", "state.pt"):
        with open(os.path.join(ckpt, name), "wb") as fh:
            fh.write(pickle.dumps(Payload()))
    data["train"]["max_steps"] = 4
    with pytest.raises(CheckpointError, match=r"checkpoint_0000003/state.safetensors: not a valid checkpoint file"):
        trainer.run(trainspec.parse(data), log=None)
    assert not os.path.exists(marker)
    # Ray Train's own list of the checkpoints, replaced by the pickle: through the CLI, one line and exit 1
    # (Ray itself stopped with a UnicodeDecodeError traceback)
    import yaml

    from pipeline import cli

    snapshot = os.path.join(out, "ray", "train", "checkpoint_manager_snapshot.json")
    with open(snapshot, "wb") as fh:
        fh.write(pickle.dumps(Payload()))
    spec_file = tmp_path / "train.yaml"
    spec_file.write_text(yaml.safe_dump(data))
    assert cli.main(["train", str(spec_file)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"winnow: bad checkpoint: {snapshot}: not a valid checkpoint file"), err
    assert "Traceback" not in "\n".join(err) and not os.path.exists(marker)


def _elastic_sees(nodes, timeout: float = 60.0) -> None:
    """Make an elastic run's first scaling decision see exactly `nodes` as the cluster's workers.

    Ray Train's elastic policy sizes the group from Ray's AutoscalingCoordinator, a detached actor
    that re-reads `ray.nodes()` only on a 20 s tick. Right after the cluster was reshaped its view
    can hold one new node and not the other, and the run then starts with one worker where two
    fit (CI saw exactly that once). So: wait until the GCS lists only `nodes` alive (a node removed
    without grace is marked dead only when its heartbeats run out), then drop the coordinator so
    the run creates a fresh one, which reads the nodes when it starts."""
    import ray

    want = {n.node_id for n in nodes}
    deadline = time.time() + timeout
    while True:
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0}
        if alive == want:
            break
        assert time.time() < deadline, f"workers alive {alive}, expected {want}"
        time.sleep(0.2)
    try:
        coordinator = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
    except ValueError:
        return                                  # none yet: the run's will be created fresh
    ray.kill(coordinator, no_restart=True)
    while True:                                 # the name is free once the GCS has it dead
        try:
            ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
        except ValueError:
            return
        assert time.time() < deadline, "Ray's AutoscalingCoordinator did not go"
        time.sleep(0.2)


@pytest.mark.slow
def test_losing_a_node_mid_training_restarts_from_the_checkpoint(sd_run, shards, tmp_path, kill_debris):
    """On a 0-CPU head with two 2-CPU nodes: remove (not gracefully) the node of one training worker
    after checkpoint 3. With ray.max_failures 1 the group restarts on the node left and ends with
    the uninterrupted run's losses and weights. Then elastic (ray.min_workers 1 of 2) on two 1-CPU
    nodes: losing one, the group restarts with one worker and the cursor remaps to world size 1."""
    import threading

    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from pipeline.commands import train as trainer
    from training import train_spec as trainspec

    clean_out, _ = sd_run

    def run_and_lose_a_node(out, cluster, nodes, **ray_options):
        spec = trainspec.parse(train_spec(shards[0], out, train={"max_steps": 12},
                                          ray={"max_failures": 1, "num_cpus": None, **ray_options}))
        result = {}

        def go():
            try:
                result["r"] = trainer.run(spec, log=None)
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                result["error"] = exc

        thread = threading.Thread(target=go)
        thread.start()
        snapshot = os.path.join(out, "ray", "train", "checkpoint_manager_snapshot.json")
        deadline = time.time() + 300
        while not (os.path.exists(snapshot) and "checkpoint_0000003" in open(snapshot).read()):
            assert thread.is_alive() and time.time() < deadline, result
            time.sleep(0.05)
        where = {
            a.node_id for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        }
        victim = next(n for n in nodes if n.node_id in where)
        cluster.remove_node(victim, allow_graceful=False)
        thread.join(timeout=600)
        assert "r" in result, result
        return result["r"]

    was = ray.is_initialized()
    ray.shutdown()
    mark = {"WINNOW_TEST_CLUSTER": str(tmp_path)}    # what kill_marked finds once the cluster is gone
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "env_vars": mark})
    try:
        nodes = [cluster.add_node(num_cpus=2, env_vars=mark) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        out = str(tmp_path / "fixed")
        summary = run_and_lose_a_node(out, cluster, nodes).summary
        assert summary["steps"] == 12 and summary["resumed_from"] in (3, 6, 9) and summary["world_size"] == 2
        assert _losses(out) == _losses(clean_out)
        a, b = _unet(clean_out), _unet(out)
        assert all(torch.equal(a[k], b[k]) for k in a)

        for n in cluster.worker_nodes.copy():
            cluster.remove_node(n)
        nodes = [cluster.add_node(num_cpus=1, env_vars=mark) for _ in range(2)]
        cluster.wait_for_nodes()
        _elastic_sees(nodes)
        out = str(tmp_path / "elastic")
        result = run_and_lose_a_node(out, cluster, nodes, min_workers=1)
        s = result.summary
        assert s["steps"] == 12 and s["resumed_from"] in (3, 6, 9) and s["world_size"] == 1
        first = s["resumed_from"]
        assert [m["world_size"] for m in result.metrics] == [2] * first + [1] * (12 - first)
        losses, clean = _losses(out), _losses(clean_out)
        assert all(losses[k] == clean[k] for k in range(1, first + 1))          # before the loss: the same steps
        assert sorted(losses) == list(range(1, 13))
    finally:
        ray.shutdown()
        cluster.shutdown()
        kill_marked("WINNOW_TEST_CLUSTER", str(tmp_path))    # a worker forked as a node went (tests.helpers)
        if was:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
