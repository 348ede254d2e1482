"""Every folder on a bucket: curate (an image folder, img2dataset shards) from the suite's S3 server to
it, select, sweep and report there, and the results equal the same commands' on local disk. The
server is real (moto on 127.0.0.1, reached through AWS_* alone); nothing here mocks a filesystem."""
from __future__ import annotations

import glob
import io
import json
import os
import shutil
import tempfile

import pyarrow.parquet as pq
import pytest

from pipeline.commands import select as selection
from pipeline.commands import sweep
from pipeline.contract import layout, storage
from pipeline.contract.config import ConfigError
from tests.helpers import kill_marked, run_curate
from tests.s3server import ACCESS_KEY, SECRET_KEY
from tests.s3server import SERVER as S3

STAGES = [{"name": "decode", "max_side": 256}, {"name": "phash_dedup"}]


def _upload_tree(root: str, bucket: str, prefix: str, local_copy: str) -> int:
    """Upload the regular files with UTF-8 names under ``root`` (an object key is UTF-8 text, and a
    FIFO is no object) and mirror exactly those into ``local_copy``; returns how many."""
    c = S3.client()
    n = 0
    for d, _, names in os.walk(root):
        for name in names:
            path = os.path.join(d, name)
            rel = os.path.relpath(path, root)
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:
                continue
            if not os.path.isfile(path) or os.path.islink(path):
                continue
            c.upload_file(path, bucket, f"{prefix}/{rel}")
            os.makedirs(os.path.dirname(os.path.join(local_copy, rel)), exist_ok=True)
            shutil.copyfile(path, os.path.join(local_copy, rel))
            n += 1
    return n


def _get(bucket: str, key: str) -> bytes:
    return S3.client().get_object(Bucket=bucket, Key=key)["Body"].read()


@pytest.fixture(scope="module")
def runs(ray_local, corpus, tmp_path_factory):
    """The corpus curated twice: from the bucket to the bucket, and from a local copy to local disk."""
    root, _ = corpus
    name = S3.new_bucket()
    local_in = str(tmp_path_factory.mktemp("s3in") / "corpus")
    uploaded = _upload_tree(root, name, "corpus", local_in)
    remote = run_curate(f"s3://{name}/corpus", f"s3://{name}/runs/a", samples_per_shard=8, stages=STAGES,
                        output_options={"report": True})
    local_out = str(tmp_path_factory.mktemp("s3local") / "a")
    local = run_curate(local_in, local_out, samples_per_shard=8, stages=STAGES)
    yield {"bucket": name, "uploaded": uploaded, "remote": remote, "local": local, "local_out": local_out,
           "run": f"s3://{name}/runs/a"}
    S3.drop_bucket(name)


def test_curate_from_a_bucket_to_a_bucket_equals_the_local_run(runs):
    name, remote, local = runs["bucket"], runs["remote"], runs["local"]
    assert remote.inputs == local.inputs == runs["uploaded"] - remote.sidecars
    assert (remote.kept, remote.rejected, remote.reasons) == (local.kept, local.rejected, local.reasons)
    assert remote.kept + remote.rejected == remote.inputs and remote.kept > 20
    a = layout.read_annotations(runs["run"]).drop_columns(["duplicate_of"])
    b = layout.read_annotations(runs["local_out"]).drop_columns(["duplicate_of"])
    assert a.column_names == b.column_names
    assert a.equals(b)
    # the shards are byte for byte the local run's: same samples, same order, same bytes
    for shard in sorted(n for n in os.listdir(os.path.join(runs["local_out"], "shards")) if n.endswith(".tar")):
        with open(os.path.join(runs["local_out"], "shards", shard), "rb") as fh:
            assert _get(name, f"runs/a/shards/{shard}") == fh.read(), shard
    keys = S3.keys(name, "runs/a/")
    assert not [k for k in keys if "/_work/" in k]                      # the fragments went with the run
    assert {"runs/a/summary.json", "runs/a/report.html", "runs/a/README.md", "runs/a/.winnow/owner.json",
            "runs/a/spec.yaml"} <= set(keys)
    assert S3.uploads(name) == []                                       # no upload left open
    assert remote.report == f"{runs['run']}/report.html"
    assert b"Funnel" in _get(name, "runs/a/report.html")


def test_a_rerun_on_the_bucket_resumes_and_changes_nothing(runs):
    name = runs["bucket"]
    before = {k: _get(name, k) for k in S3.keys(name, "runs/a/shards/")}
    again = run_curate(f"s3://{name}/corpus", runs["run"], samples_per_shard=8, stages=STAGES,
                       output_options={"report": True})
    assert again.already_complete and again.kept == runs["remote"].kept
    assert {k: _get(name, k) for k in S3.keys(name, "runs/a/shards/")} == before


def test_sweep_and_select_with_every_folder_on_the_bucket(runs, tmp_path):
    name, run = runs["bucket"], runs["run"]
    filters = [{"column": "width", "keep": "high", "drop_fractions": [0.5]}]
    sw = sweep.run(sweep.parse({"annotations": [run], "output": f"s3://{name}/sweeps/s", "plots": True,
                                "sheets": {"per_side": 2, "thumb": 32}, "filters": filters}))
    assert sw.cells[1].name.endswith("(drop0.5)")
    manifest = f"s3://{name}/sweeps/s/selections/cell_001.parquet"
    assert layout.manifest_runs(manifest) == [run]
    keys = set(S3.keys(name, "sweeps/s/"))
    assert {"sweeps/s/sweep.json", "sweeps/s/cells.csv", "sweeps/s/plots/histograms_survival.png"} <= keys
    assert any(k.startswith("sweeps/s/sheets/") for k in keys)
    out = f"s3://{name}/picked"
    r = selection.run(selection.parse({"selection": manifest, "output": {"path": out, "samples_per_shard": 5}}),
                      log=None)
    want = sorted(
        pq.read_table(io.BytesIO(_get(name, "sweeps/s/selections/cell_001.parquet"))).column("key").to_pylist()
    )
    got = layout.read_annotations(out)
    assert r.selected == len(want) == got.num_rows and sorted(got.column("key").to_pylist()) == want
    assert json.loads(_get(name, "picked/summary.json"))["source_runs"] == [run]
    # the same selection made locally from the local run holds the same samples, byte for byte
    local_manifest = str(tmp_path / "cell.parquet")
    sel = pq.read_table(io.BytesIO(_get(name, "sweeps/s/selections/cell_001.parquet")))
    pq.write_table(sel.replace_schema_metadata({layout.MANIFEST_RUNS: json.dumps([runs["local_out"]])}), local_manifest)
    selection.run(selection.parse({"selection": local_manifest, "output": {"path": str(tmp_path / "p"),
                                   "samples_per_shard": 5, "report": False}}), log=None)
    for shard in sorted(n for n in os.listdir(tmp_path / "p" / "shards") if n.endswith(".tar")):
        assert _get(name, f"picked/shards/{shard}") == (tmp_path / "p" / "shards" / shard).read_bytes()


def test_img2dataset_shards_on_a_bucket(ray_local, bucket, tmp_path):
    """A winnow run's tars are img2dataset's layout: read them back from the bucket as input."""
    from pipeline.corpus import make_corpus

    root = str(tmp_path / "c")
    make_corpus(root, n_images=10, seed=3, bad=False, max_side=300)
    first = run_curate(root, f"{bucket}/first", samples_per_shard=4, stages=[{"name": "decode"}])
    again = run_curate(f"{bucket}/first/shards", f"{bucket}/second", samples_per_shard=4,
                       stages=[{"name": "decode"}])
    assert again.inputs == first.kept and again.kept == first.kept
    t = layout.read_annotations(f"{bucket}/second")
    tars = storage.files_in(f"{bucket}/first/shards", ".tar")
    assert len(tars) == -(-first.inputs // 4) and set(t.column("source").to_pylist()) == set(tars)


def test_no_credential_reaches_a_file_winnow_wrote(runs):
    name = runs["bucket"]
    for key in S3.keys(name, "runs/"):
        data = _get(name, key)
        assert SECRET_KEY.encode() not in data and ACCESS_KEY.encode() not in data, key


def test_bad_object_storage_outputs_fail_before_ray(corpus, bucket):
    root, _ = corpus
    with pytest.raises(ConfigError, match="does not exist"):
        run_curate(root, "s3://wt-missing-bucket-x/out")
    storage.write_once(f"{bucket}/taken", b"a file")
    with pytest.raises(ConfigError, match="is a file on the store"):
        run_curate(root, f"{bucket}/taken")
    with pytest.raises(ConfigError, match="credential"):
        run_curate(root, f"{bucket}/o", input={"storage_options": {"secret": "x"}})


def test_a_dry_run_to_a_bucket_measures_the_store_and_leaves_nothing(runs, tmp_path, monkeypatch):
    from pipeline.commands import curate, curate_spec

    monkeypatch.chdir(tmp_path)                 # a URL taken for a local path would appear here as s3:/...
    name = runs["bucket"]
    before = S3.keys(name)
    spec = curate_spec.parse({"input": {"path": f"s3://{name}/corpus"}, "stages": STAGES,
                              "output": {"path": f"s3://{name}/runs/planned", "samples_per_shard": 8},
                              "dry_run": {"enabled": True, "sample": 16}})
    r = curate.run(spec, log=None)
    assert r.sampled == 16 and r.projected_output_bytes > 0
    assert r.store["write_mb_s"] > 0 and r.store["read_mb_s"] > 0 and r.store["probe_mb"] == 32
    assert any("the output's store took" in n for n in r.notes)
    from pipeline.commands.dry_run import format_summary

    assert "  store      write " in format_summary(r)
    assert S3.keys(name) == before and S3.uploads(name) == [] and os.listdir(tmp_path) == []


def test_bucket_models_and_folders_are_checked_before_any_work(bucket):
    """A pipeline, checkpoint or eval folder on the bucket is checked as a local one is, before Ray
    starts."""
    from pipeline.commands import eval as evaluate
    from pipeline.commands import inflate
    from training import train_spec

    name = bucket.split("://", 1)[1]
    c = S3.client()
    c.put_object(Bucket=name, Key="sd15/unet/config.json", Body=b"{}")
    c.put_object(Bucket=name, Key="ckpt/meta.json", Body=b"{}")
    spec = {"data": {"shards": [f"{bucket}/run"]}, "model": {"kind": "sd"}, "output": {"path": f"{bucket}/t"}}
    with pytest.raises(ConfigError, match=rf"model.pretrained: '{bucket}/sd15' has no model_index.json"):
        train_spec.parse({**spec, "model": {"kind": "sd", "pretrained": f"{bucket}/sd15"}})
    c.put_object(Bucket=name, Key="sd15/model_index.json", Body=b"{}")
    with pytest.raises(ConfigError, match=r"lacks vae, text_encoder, tokenizer, scheduler/ needed"):
        train_spec.parse({**spec, "model": {"kind": "sd", "pretrained": f"{bucket}/sd15"}})
    with pytest.raises(ConfigError, match=rf"optim.init_state: '{bucket}/ckpt' has no state.json"):
        train_spec.parse({**spec, "optim": {"init_state": f"{bucket}/ckpt"}})
    with pytest.raises(ConfigError, match=rf"--prompts: '{bucket}/prompts.txt' is neither a text file"):
        evaluate.plan(evaluate.EvalSpec(images=f"{bucket}/sd15", prompts=f"{bucket}/prompts.txt"))
    with pytest.raises(ConfigError, match=rf"--run: '{bucket}/t' has no train_spec.yaml"):
        c.put_object(Bucket=name, Key="prompts.txt", Body=b"a photo\n")
        evaluate.plan(evaluate.EvalSpec(run=f"{bucket}/t", prompts=f"{bucket}/prompts.txt"))
    with pytest.raises(ConfigError, match="exists and is not empty"):
        inflate.plan(inflate.InflateSpec(f"{bucket}/sd15", f"{bucket}/sd15"))
    assert S3.uploads(name) == []


def test_inflate_from_a_bucket_to_a_bucket_writes_the_local_folder(bucket, tmp_path):
    """`winnow inflate` with the image pipeline and the output on the bucket writes the same files,
    byte for byte, as the local command on a local copy."""
    import torch

    from pipeline.commands import inflate
    from training.families import get

    name = bucket.split("://", 1)[1]
    comps = get("sd").tiny(0, str(tmp_path / "scratch"))
    get("sd").export(comps, comps.unet, str(tmp_path / "sd"))
    assert storage.copy_tree(str(tmp_path / "sd"), f"{bucket}/models/sd") > 5
    torch.manual_seed(0)                  # the new temporal layers start from the global generator
    remote = inflate.run(inflate.InflateSpec(f"{bucket}/models/sd", f"{bucket}/models/svd", 8, 6))
    torch.manual_seed(0)
    local = inflate.run(inflate.InflateSpec(str(tmp_path / "sd"), str(tmp_path / "svd"), 8, 6))
    assert remote["counts"] == local["counts"] and remote["output"] == f"{bucket}/models/svd"
    want = {os.path.relpath(f, tmp_path / "svd"): open(f, "rb").read() for f in storage.find(str(tmp_path / "svd"))}
    got = {k[len("models/svd/"):]: _get(name, k) for k in S3.keys(name, "models/svd/")}
    info = {k: json.loads(v.pop("inflation.json")) for k, v in (("remote", got), ("local", want))}
    assert info["remote"].pop("source") == f"{bucket}/models/sd"            # the source as the user named it
    assert info["local"].pop("source") == str(tmp_path / "sd") and info["remote"] == info["local"]
    assert got == want and {"diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"} <= set(
        got
    )
    assert S3.uploads(name) == []


def _train(shards: str, out: str, **train):
    from pipeline.commands import train as trainer
    from training import train_spec as trainspec

    spec = {"data": {"shards": [shards], "resolution": 96, "bucket_step": 32, "max_aspect": 2.0, "workers": 2},
            "model": {"kind": "sd"},
            "train": {"batch_size": 2, "max_steps": 6, "checkpoint_every": 3, "log_every": 1,
                      "sample_prompts": ["a photo"], "sample_steps": 2, **train},
            "ray": {"num_workers": 2, "num_cpus": 2}, "output": {"path": out}}
    return trainer.run(trainspec.parse(spec), log=None)


@pytest.fixture(scope="module")
def bucket_train(runs):
    """An uninterrupted 2-worker tiny-SD run from the bucket's shards to the bucket."""
    return _train(runs["run"], f"s3://{runs['bucket']}/train/sd")


@pytest.mark.slow
def test_training_from_and_to_a_bucket_equals_the_local_run(runs, bucket_train, tmp_path):
    """Shards on the bucket, every output on it (checkpoints through Ray Train's own storage, metrics,
    TensorBoard, samples, the exported pipeline): the losses and weights are the local run's."""
    from safetensors.torch import load as load_safetensors
    from safetensors.torch import load_file

    name = runs["bucket"]
    remote = bucket_train
    local = _train(runs["local_out"], str(tmp_path / "sd"))
    assert [m["step"] for m in remote.metrics] == list(range(1, 7))
    assert [m["loss"] for m in remote.metrics] == [m["loss"] for m in local.metrics]
    weights = "unet/diffusion_pytorch_model.safetensors"
    a = load_safetensors(_get(name, f"train/sd/final/{weights}"))
    b = load_file(str(tmp_path / "sd" / "final" / weights))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    keys = S3.keys(name, "train/sd/")
    assert any(k.startswith("train/sd/ray/train/checkpoint_0000006/") for k in keys)
    assert any(k.startswith("train/sd/tensorboard/events.out.tfevents.") for k in keys)
    assert {"train/sd/summary.json", "train/sd/metrics.jsonl", "train/sd/index.parquet",
            "train/sd/samples/step0000006_0.png", "train/sd/final/model_index.json"} <= set(keys)
    assert S3.uploads(name) == []


@pytest.mark.slow
@pytest.mark.parametrize("phase, marker", [("annotate", "/_work/rows/"), ("shards", "_stats.json")])
def test_kill9_of_a_bucket_curate_then_rerun_equals_the_clean_run(runs, tmp_path, phase, marker):
    """SIGKILL the CLI and its Ray once the first fragment (or shard) is on the bucket; the re-run
    finishes to the clean run's shards, byte for byte, with no sample twice and no upload left open."""
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from tests.helpers import killable_env

    name = runs["bucket"]
    out = f"runs/kill-{phase}"
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"kind": "curate", "input": {"path": f"s3://{name}/corpus"},
                                    "output": {"path": f"s3://{name}/{out}", "samples_per_shard": 8, "report": False},
                                    "stages": STAGES, "ray": {"block_rows": 2, "num_cpus": 2}}))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "curate", str(spec)], cwd=root,
                            env=killable_env(root), start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not any(marker in k for k in S3.keys(name, out + "/")):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert f"{out}/summary.json" not in S3.keys(name, out + "/")           # it really was interrupted
    run_curate(f"s3://{name}/corpus", f"s3://{name}/{out}", samples_per_shard=8, stages=STAGES,
               output_options={"report": False})
    clean = {k.rsplit("/", 1)[1]: _get(name, k) for k in S3.keys(name, "runs/a/shards/") if k.endswith(".tar")}
    again = {k.rsplit("/", 1)[1]: _get(name, k) for k in S3.keys(name, f"{out}/shards/") if k.endswith(".tar")}
    assert again == clean
    assert layout.read_annotations(f"s3://{name}/{out}").equals(layout.read_annotations(runs["run"]))
    assert not [k for k in S3.keys(name, out + "/") if "/_work/" in k] and S3.uploads(name) == []


@pytest.mark.slow
def test_a_video_folder_on_a_bucket_curates_like_the_local_folder(ray_local, bucket, tmp_path):
    """Videos are probed and cut from the bucket (seekable range reads), clips land on it; the
    clips, their rows and the table of videos are the local run's."""
    from pipeline.synth import make_video_corpus

    root = str(tmp_path / "videos")
    make_video_corpus(root)
    name = bucket[len("s3://"):]
    local_in = str(tmp_path / "mirror")
    _upload_tree(root, name, "videos", local_in)
    stages = [{"name": "clips", "min_s": 1.0, "max_s": 4.0}, {"name": "motion"}]
    remote = run_curate(f"{bucket}/videos", f"{bucket}/vrun", stages=stages, output_options={"videos_per_shard": 4})
    local = run_curate(local_in, str(tmp_path / "vrun"), stages=stages, output_options={"videos_per_shard": 4})
    assert (remote.inputs, remote.kept, remote.reasons, remote.videos) == (local.inputs, local.kept, local.reasons,
                                                                            local.videos)
    a = layout.read_annotations(f"{bucket}/vrun")
    b = layout.read_annotations(str(tmp_path / "vrun"))
    assert a.column("key").to_pylist() == b.column("key").to_pylist()
    assert a.column("status").to_pylist() == b.column("status").to_pylist()
    assert layout.read_videos(f"{bucket}/vrun").column("source").to_pylist() == \
        layout.read_videos(str(tmp_path / "vrun")).column("source").to_pylist()
    import tarfile

    def members(data: bytes) -> dict:
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            return {m.name: tf.extractfile(m).read() for m in tf}

    for shard in sorted(n for n in os.listdir(tmp_path / "vrun" / "shards") if n.endswith(".tar")):
        x = members(_get(name, f"vrun/shards/{shard}"))
        y = members((tmp_path / "vrun" / "shards" / shard).read_bytes())
        assert list(x) == list(y), shard
        assert x == y, [k for k in x if x[k] != y[k]][:5]        # clips, captions and rows


@pytest.mark.slow
def test_a_store_that_stops_for_20_s_mid_curate_loses_nothing(runs, tmp_path):
    """The S3 server goes away for 20 s once the first fragments are written, then comes back: the
    run waits (retries with backoff) and ends with the clean run's shards, nothing twice, nothing lost."""
    import subprocess
    import sys
    import time

    import yaml

    from tests.helpers import killable_env

    name, out = runs["bucket"], "runs/outage"
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"kind": "curate", "input": {"path": f"s3://{name}/corpus"},
                                    "output": {"path": f"s3://{name}/{out}", "samples_per_shard": 8, "report": False},
                                    "stages": STAGES, "ray": {"block_rows": 2, "num_cpus": 2}}))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "curate", str(spec)], cwd=root,
                            env=killable_env(root), start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while not any("/_work/rows/" in k for k in S3.keys(name, out + "/")):
            assert proc.poll() is None and time.time() < deadline, "the run ended before the outage"
            time.sleep(0.02)
        S3.stop()
        time.sleep(20)
        S3.start()
        log, _ = proc.communicate(timeout=400)
    finally:
        S3.start()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log[-3000:]
    clean = {k.rsplit("/", 1)[1]: _get(name, k) for k in S3.keys(name, "runs/a/shards/") if k.endswith(".tar")}
    again = {k.rsplit("/", 1)[1]: _get(name, k) for k in S3.keys(name, f"{out}/shards/") if k.endswith(".tar")}
    assert again == clean
    assert layout.read_annotations(f"s3://{name}/{out}").equals(layout.read_annotations(runs["run"]))
    assert S3.uploads(name) == [] and SECRET_KEY not in log


def _files(root: str, skip: tuple[str, ...]) -> set[str]:
    out = set()
    for d, dirs, names in os.walk(root):
        dirs[:] = [x for x in dirs if not os.path.join(d, x).startswith(skip)]
        out.update(os.path.join(d, n) for n in names)
    return out


@pytest.mark.slow
def test_a_shared_nothing_cluster_curates_through_the_bucket_and_survives_a_lost_node(runs, tmp_path, kill_debris):
    """A head and two worker nodes, each with its own scratch folder; input and output on the S3
    server. No file appears outside the scratch folders (and Ray's own logs); one node removed once
    the first fragments are on the bucket, and the run still ends with the single-node run's rows
    and shards, byte for byte."""
    import threading
    import time

    import ray
    from ray.cluster_utils import Cluster

    session_tmp = tempfile.gettempdir()          # the suite's one temporary folder (tests/conftest.py)
    name = runs["bucket"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    scratch = {n: str(tmp_path / n) for n in ("head", "node1", "node2")}
    for d in scratch.values():
        os.makedirs(d)
    watched_skip = (os.path.join(root, ".git"), os.path.join(root, ".venv"), os.path.join(session_tmp, "ray"),
                    str(tmp_path))
    before = _files(root, watched_skip) | _files(session_tmp, watched_skip)

    def env(n):
        return {"WINNOW_SCRATCH": scratch[n], "TMPDIR": scratch[n]}

    was = ray.is_initialized()
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "env_vars": env("head")})
    try:
        nodes = [cluster.add_node(num_cpus=1, env_vars=env(n)) for n in ("node1", "node2")]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)

        def remove_after_first_rows():
            while not any("/_work/rows/" in k for k in S3.keys(name, "runs/cluster/")):
                time.sleep(0.05)
            cluster.remove_node(nodes[-1], allow_graceful=False)

        killer = threading.Thread(target=remove_after_first_rows, daemon=True)
        killer.start()
        cut = run_curate(f"s3://{name}/corpus", f"s3://{name}/runs/cluster", samples_per_shard=8, stages=STAGES,
                         output_options={"report": False})
        killer.join(timeout=60)
        assert not killer.is_alive()
    finally:
        ray.shutdown()
        cluster.shutdown()
        for d in scratch.values():      # a worker the raylet forked as its node went (tests.helpers.kill_marked)
            kill_marked("TMPDIR", d)
        if was:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    assert (cut.inputs, cut.kept, cut.rejected) == (runs["remote"].inputs, runs["remote"].kept, runs["remote"].rejected)
    clean = {k.rsplit("/", 1)[1]: _get(name, k) for k in S3.keys(name, "runs/a/shards/") if k.endswith(".tar")}
    again = {k.rsplit("/", 1)[1]: _get(name, k) for k in S3.keys(name, "runs/cluster/shards/") if k.endswith(".tar")}
    assert again == clean
    assert layout.read_annotations(f"s3://{name}/runs/cluster").equals(layout.read_annotations(runs["run"]))
    after = _files(root, watched_skip) | _files(session_tmp, watched_skip)
    # Python's own multiprocessing runtime folder (pymp-*, a listener socket of the driver) is not a file
    # winnow wrote; anything else new is
    new = sorted(f for f in after - before if not f.endswith((".pyc", ".ses")) and "/pymp-" not in f)
    assert new == [], new[:10]                       # nothing outside the scratch folders and the bucket


@pytest.mark.slow
def test_a_shared_nothing_cluster_trains_through_the_bucket_and_survives_a_lost_node(runs, bucket_train, tmp_path,
                                                                                    kill_debris):
    """A 0-CPU head and two 2-CPU nodes, each with its own scratch folder; shards and output on the
    bucket. The node of a training worker is removed after checkpoint 3 is recorded (on the bucket);
    with ray.max_failures 1 the group restarts on the node left from that checkpoint, read back from
    the bucket, and ends with the uninterrupted run's losses and weights, bit for bit."""
    import threading
    import time

    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from pipeline.commands import train as trainer
    from training import train_spec as trainspec

    name = runs["bucket"]
    scratch = {n: str(tmp_path / n) for n in ("head", "node1", "node2")}
    for d in scratch.values():
        os.makedirs(d)

    def env(n):
        return {"WINNOW_SCRATCH": scratch[n], "TMPDIR": scratch[n]}

    spec = trainspec.parse({"data": {"shards": [runs["run"]], "resolution": 96, "bucket_step": 32, "max_aspect": 2.0,
                                     "workers": 2},
                            "model": {"kind": "sd"},
                            "train": {"batch_size": 2, "max_steps": 6, "checkpoint_every": 3, "log_every": 1,
                                      "sample_prompts": ["a photo"], "sample_steps": 2},
                            "ray": {"num_workers": 2, "max_failures": 1},
                            "output": {"path": f"s3://{name}/train/lost"}})
    snapshot = "train/lost/ray/train/checkpoint_manager_snapshot.json"
    was = ray.is_initialized()
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "env_vars": env("head")})
    result = {}
    try:
        nodes = [cluster.add_node(num_cpus=2, env_vars=env(n)) for n in ("node1", "node2")]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)

        def go():
            try:
                result["r"] = trainer.run(spec, log=None)
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                result["error"] = exc

        thread = threading.Thread(target=go)
        thread.start()
        deadline = time.time() + 300
        while not (snapshot in S3.keys(name, "train/lost/ray/") and b"checkpoint_0000003" in _get(name, snapshot)):
            assert thread.is_alive() and time.time() < deadline, result
            time.sleep(0.1)
        where = {
            a.node_id for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        }
        cluster.remove_node(next(n for n in nodes if n.node_id in where), allow_graceful=False)
        thread.join(timeout=600)
    finally:
        ray.shutdown()
        cluster.shutdown()
        for d in scratch.values():      # a worker the raylet forked as its node went (tests.helpers.kill_marked)
            kill_marked("TMPDIR", d)
        if was:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    assert "r" in result, result
    s = result["r"].summary
    assert s["steps"] == 6 and s["resumed_from"] in (3, 6) and s["world_size"] == 2
    assert [m["loss"] for m in result["r"].metrics] == [m["loss"] for m in bucket_train.metrics]
    from safetensors.torch import load as load_safetensors

    weights = "unet/diffusion_pytorch_model.safetensors"
    a = load_safetensors(_get(name, f"train/lost/final/{weights}"))
    b = load_safetensors(_get(name, f"train/sd/final/{weights}"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


@pytest.mark.slow
def test_kill9_of_training_on_the_bucket_then_rerun_equals_the_uninterrupted_run(runs, bucket_train, tmp_path):
    """SIGKILL the CLI and its Ray once Ray Train has recorded checkpoint 3 on the bucket; the re-run
    reads it back from the bucket and ends with the uninterrupted run's losses and weights, bit for bit,
    every step's metrics once, no upload left open."""
    import subprocess
    import sys

    import yaml

    from tests.helpers import kill_at_checkpoint, killable_env

    name = runs["bucket"]
    out = f"s3://{name}/train/kill"
    spec = {"kind": "train", "data": {"shards": [runs["run"]], "resolution": 96, "bucket_step": 32, "max_aspect": 2.0,
                                      "workers": 2},
            "model": {"kind": "sd"},
            "train": {"batch_size": 2, "max_steps": 6, "checkpoint_every": 3, "log_every": 1,
                      "sample_prompts": ["a photo"], "sample_steps": 2},
            "ray": {"num_workers": 2, "num_cpus": 2}, "output": {"path": out}}
    # the spec itself on the bucket: `winnow train s3://...` reads it from there
    S3.client().put_object(Bucket=name, Key="specs/train.yaml", Body=yaml.safe_dump(spec).encode())
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "pipeline.cli", "train", f"s3://{name}/specs/train.yaml"]
    proc = subprocess.Popen(cmd, cwd=root, env=killable_env(root), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_at_checkpoint(proc, out, 3)
    assert "train/kill/final/model_index.json" not in S3.keys(name, "train/kill/")     # it really was interrupted
    rerun = subprocess.run(cmd, cwd=root, env=killable_env(root), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(_get(name, "train/kill/summary.json"))
    assert summary["resumed_from"] == 3 and summary["steps"] == 6
    metrics = [json.loads(line) for line in _get(name, "train/kill/metrics.jsonl").splitlines() if line]
    by_step = {m["step"]: m["loss"] for m in metrics if "loss" in m}
    assert by_step == {m["step"]: m["loss"] for m in bucket_train.metrics}
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert _get(name, f"train/kill/final/{weights}") == _get(name, f"train/sd/final/{weights}")
    assert S3.uploads(name) == []


@pytest.mark.slow
def test_eval_study_and_a_curriculum_with_every_folder_on_the_bucket(runs, bucket_train, tmp_path):
    """`winnow eval` of the bucket's run (prompts, reference shards and samples on the bucket) scores
    what the same command scores on a local copy; a study of a bucket sweep and a two-stage curriculum
    (the second stage starting from the first's weights and AdamW moments) write everything there,
    and their re-runs train nothing again."""
    import numpy as np
    from PIL import Image
    from safetensors.torch import load as load_safetensors

    from pipeline.commands import curriculum, study
    from pipeline.commands import eval as evaluate

    name = runs["bucket"]
    b = f"s3://{name}"
    session_tmp, root = tempfile.gettempdir(), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    skip = (os.path.join(root, ".git"), os.path.join(root, ".venv"), os.path.join(session_tmp, "ray"), str(tmp_path))
    before = _files(root, skip) | _files(session_tmp, skip)
    S3.client().put_object(Bucket=name, Key="eval/prompts.txt", Body=b"a photo\na red square\n# a comment\n")
    local_run = storage.fetch(f"{b}/train/sd", str(tmp_path / "sd"))       # a local copy of the run, before eval
    remote = evaluate.run(evaluate.EvalSpec(run=f"{b}/train/sd", prompts=f"{b}/eval/prompts.txt",
                                            reference=runs["run"], fid_weights="random", num=2, steps=2, size=64),
                          log=None)
    (tmp_path / "prompts.txt").write_bytes(_get(name, "eval/prompts.txt"))
    local = evaluate.run(evaluate.EvalSpec(run=local_run, prompts=str(tmp_path / "prompts.txt"),
                                           reference=runs["local_out"], fid_weights="random", num=2, steps=2, size=64),
                         log=None)
    assert remote.images == f"{b}/train/sd/eval/final" and remote.generated == local.generated == 2
    assert (remote.clip_score, remote.clip_cosine, remote.counts) == (local.clip_score, local.clip_cosine, local.counts)
    # the same features; FID's matrix square root of 2-image (rank-1) covariances amplifies float64
    # rounding of the summation order to ~1e-6 relative
    assert remote.fid == pytest.approx(local.fid, rel=1e-4)

    # the same pixels up to one level of 255: float32 sums in another memory layout round alike but
    # for the last bit, which can move a value across a .5 boundary
    for f in ("00000.png", "00001.png"):
        x = np.asarray(Image.open(io.BytesIO(_get(name, f"train/sd/eval/final/{f}"))), dtype=int)
        y = np.asarray(Image.open(tmp_path / "sd" / "eval" / "final" / f), dtype=int)
        assert x.shape == y.shape == (64, 64, 3) and np.abs(x - y).max() <= 1 and (x != y).mean() < 0.01
    assert _get(name, "train/sd/eval/final/prompts.jsonl") == (tmp_path / "sd/eval/final/prompts.jsonl").read_bytes()

    # a study: the sweep, every cell's run and its eval, the table and the plot on the bucket
    filters = [{"column": "width", "keep": "high", "drop_fractions": [0.5]}]
    sweep.run(sweep.parse({"annotations": [runs["run"]], "output": f"{b}/study/sweep", "filters": filters}))
    train = {"data": {"resolution": 96, "bucket_step": 32, "max_aspect": 2.0, "workers": 2}, "model": {"kind": "sd"},
             "train": {"batch_size": 2, "max_steps": 2, "checkpoint_every": 2, "log_every": 1, "sample_prompts": []},
             "ray": {"num_workers": 2, "num_cpus": 2}}
    doc = {"sweep": f"{b}/study/sweep", "output": f"{b}/study/out", "train": train, "cells": ["cell_001"],
           "eval": {"prompts": f"{b}/eval/prompts.txt", "num": 2, "steps": 2, "size": 64}}
    first = study.run(study.parse(doc), log=None)
    keys = set(S3.keys(name, "study/out/"))
    assert {"study/out/study.md", "study/out/study.csv", "study/out/study.json", "study/out/plots/scores_vs_kept.png",
            "study/out/cells/cell_001/summary.json", "study/out/cells/cell_001/eval/study_eval.json",
            "study/out/cells/cell_001/eval/final/00001.png"} <= keys
    assert first.rows[0]["steps"] == 2 and first.rows[0]["clip_score"] is not None
    stamp = storage.stamp(f"{b}/study/out/cells/cell_001/final/unet/diffusion_pytorch_model.safetensors")
    again = study.run(study.parse(doc), log=None)
    assert again.rows == first.rows             # resumed: the cell is neither trained nor scored again
    assert storage.stamp(f"{b}/study/out/cells/cell_001/final/unet/diffusion_pytorch_model.safetensors") == stamp

    # a curriculum: stage 2 starts from stage 1's final weights and optimizer state, through the bucket
    stage = {"data": {"shards": [runs["run"]], "resolution": 96, "bucket_step": 32, "max_aspect": 2.0},
             "model": {"kind": "sd"},
             "train": {"batch_size": 2, "max_steps": 2, "checkpoint_every": 2, "log_every": 1, "sample_prompts": []}}
    cdoc = {"kind": "curriculum", "output": {"path": f"{b}/cur"}, "ray": {"num_workers": 2, "num_cpus": 2},
            "stages": [{"name": "one", **stage}, {"name": "two", "init": "previous", "optimizer": "carry", **stage}]}
    r = curriculum.run(curriculum.parse(cdoc), log=None)
    assert [s["steps"] for s in r.stages] == [2, 2] and r.final == f"{b}/cur/final"
    keys = set(S3.keys(name, "cur/"))
    init = [k for k in keys if k.startswith("cur/init/02_") and k.endswith("/model_index.json")]
    assert len(init) == 1
    folder = init[0].rsplit("/", 1)[0]
    assert {f"{folder}/optimizer_state/state.json", f"{folder}/optimizer_state/state.safetensors",
            "cur/final/model_index.json", "cur/stages/02_two/final/model_index.json"} <= keys
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert _get(name, f"{folder}/{unet}") == _get(name, f"cur/stages/01_one/final/{unet}")  # stage 2 began there
    a, z = (
        load_safetensors(_get(name, f"cur/stages/01_one/final/{unet}")),
        load_safetensors(_get(name, f"cur/final/{unet}")),
    )
    assert any(not (a[k] == z[k]).all() for k in a)                   # and trained on from there
    again = curriculum.run(curriculum.parse(cdoc), log=None)
    assert all(s["skipped"] for s in again.stages)
    assert S3.uploads(name) == []
    # nothing but the bucket (and the local copies this test made in tmp_path): every scratch copy is gone
    after = _files(root, skip) | _files(session_tmp, skip)
    assert sorted(f for f in after - before if not f.endswith((".pyc", ".ses")) and "/pymp-" not in f) == []


@pytest.mark.slow
def test_the_latent_cache_on_a_bucket_trains_like_the_local_cache(runs, tmp_path):
    """data.cache with shards and output on the bucket: the encoder actors write one object per block,
    each worker fills its memory maps in its own scratch from them; the losses are the local cached
    run's, bit for bit, and a second run reuses the blocks."""
    name = runs["bucket"]
    spec = {"data": {"cache": True, "random_crop": False}, "objective": {"caption_dropout": 0.5}}

    def cached(shards, out, steps=3):
        from pipeline.commands import train as trainer
        from training import train_spec as trainspec

        doc = {"data": {"shards": [shards], "resolution": 96, "bucket_step": 32, "max_aspect": 2.0, "workers": 2,
                        **spec["data"]},
               "model": {"kind": "sd"}, "objective": spec["objective"],
               "train": {"batch_size": 2, "max_steps": steps, "checkpoint_every": 3, "log_every": 1,
                         "sample_prompts": []},
               "ray": {"num_workers": 2, "num_cpus": 2}, "output": {"path": out}}
        return trainer.run(trainspec.parse(doc), log=None)

    remote = cached(runs["run"], f"s3://{name}/train/cached")
    local = cached(runs["local_out"], str(tmp_path / "cached"))
    assert [m["loss"] for m in remote.metrics] == [m["loss"] for m in local.metrics]
    keys = S3.keys(name, "train/cached/cache/")
    blocks = [k for k in keys if "/blocks/" in k]
    assert blocks and all(k.endswith(".npz") for k in blocks)
    done = [k for k in keys if k.endswith("/done.json")]
    assert len(done) == 1
    local_done = glob.glob(str(tmp_path / "cached" / "cache" / "*" / "done.json"))
    assert json.loads(_get(name, done[0])) == json.loads(open(local_done[0]).read())
    stamp = storage.stamp(f"s3://{name}/{done[0]}")
    again = cached(runs["run"], f"s3://{name}/train/cached", steps=4)
    assert again.summary["resumed_from"] == 3 and storage.stamp(f"s3://{name}/{done[0]}") == stamp
    assert S3.uploads(name) == []
