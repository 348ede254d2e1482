"""``winnow submit`` and ``winnow jobs`` against a real Ray cluster (``ray start --head`` with its
job API), and joining a running cluster instead of starting a second Ray."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from pipeline.cli import main
from tests.helpers import killable_env

BIN = os.path.dirname(sys.executable)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(argv, env):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *argv], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


def test_submit_checks_the_spec_before_anything_is_sent(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    spec = tmp_path / "s.yaml"
    spec.write_text("input: {path: /nowhere}\noutput: {path: /tmp/x}\nstages: [{name: decode, max_sid: 5}]\n")
    # an address nothing listens on: a bad spec must fail before any connection is tried
    assert main(["submit", str(spec), "--address", "http://127.0.0.1:9"]) == 2
    assert "max_sid" in capsys.readouterr().err
    assert main(["submit", str(spec)]) == 2
    assert "set RAY_ADDRESS" in capsys.readouterr().err
    assert main(["jobs", "status"]) == 2
    # nothing listens there (a process of its own: Ray reads its auth mode once per process)
    res = _cli(["jobs", "list", "--address", "http://127.0.0.1:9"], dict(os.environ))
    assert res.returncode == 1 and "winnow: http://127.0.0.1:9: " in res.stderr


def test_the_submitted_entrypoint_carries_the_spec_in_the_environment(tmp_path, monkeypatch):
    from jobs.run import spec_from_env
    from pipeline.commands.submit import SPEC_ENV, SPEC_NAME_ENV, Submission, entrypoint, runtime_env

    spec = tmp_path / "mine.yaml"
    spec.write_text("kind: curate\ninput: {path: /data}\n")
    sub = Submission("http://h:8265", str(spec), "curate", ["ray.num_cpus=4"])
    assert entrypoint(sub) == f"python -m jobs.run --spec-env {SPEC_ENV} --set ray.num_cpus=4"
    env = runtime_env(sub)
    assert env["env_vars"] == {SPEC_ENV: spec.read_text(), SPEC_NAME_ENV: "mine.yaml"}
    assert ".venv" in env["excludes"] and os.path.isfile(os.path.join(env["working_dir"], "jobs", "run.py"))
    assert "working_dir" not in runtime_env(Submission("http://h:8265", str(spec), "curate", [], installed=True))
    monkeypatch.setenv(SPEC_ENV, spec.read_text())
    monkeypatch.setenv(SPEC_NAME_ENV, "mine.yaml")
    argv = spec_from_env(["--spec-env", SPEC_ENV, "--set", "a=1"])
    assert os.path.basename(argv[0]) == "mine.yaml" and open(argv[0]).read() == spec.read_text()
    assert argv[1:] == ["--set", "a=1"]
    from jobs.run import SPEC_FOLDERS

    assert SPEC_FOLDERS == [os.path.dirname(argv[0])]     # jobs.run removes it when the command returns
    import shutil

    shutil.rmtree(SPEC_FOLDERS.pop())


def _stop_cluster(port: int) -> None:
    """Stop the cluster on GCS ``port`` only (``ray stop`` would stop every Ray on the machine,
    the test session's own included)."""
    import psutil
    from ray._common.utils import get_ray_address_file
    from ray._private.utils import read_ray_address

    mine = [p for p in psutil.process_iter(["cmdline"])
            if any(a.endswith(f":{port}") or a == f"--gcs_server_port={port}" for a in (p.info["cmdline"] or []))]
    for p in mine:
        p.kill()
    psutil.wait_procs(mine, timeout=30)
    if (read_ray_address(None) or "").endswith(f":{port}"):       # the marker `ray start` leaves for ray.init()
        os.remove(get_ray_address_file(None))          # under RAY_TMPDIR (the suite sets it)


@pytest.mark.slow
def test_submit_runs_a_spec_on_a_cluster_and_jobs_reports_it(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (48 + i, 64, 3), dtype=np.uint8)).save(
            tmp_path / "images" / f"{i:02d}.jpg"
        )
    (tmp_path / "images" / "bad.jpg").write_bytes(b"not a jpeg")
    spec = tmp_path / "curate.yaml"
    spec.write_text(f"input: {{path: {tmp_path / 'images'}}}\noutput: {{path: {tmp_path / 'out'}}}\n"
                    f"stages: [{{name: decode, max_side: 32}}]\n")
    port, dash = _free_port(), _free_port()
    # token auth on, both sides (Ray 2.60's default for a new cluster), with a token of the test's own;
    # every winnow command runs as its own process, as a user runs them
    token = "winnow-test-" + "".join(rng.choice(list("abcdef0123456789"), 32))
    # the cluster is stopped with SIGKILL: its processes' temporary files go to a folder of their own
    env = {**killable_env(ROOT), "PATH": BIN + os.pathsep + os.environ.get("PATH", ""), "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": token}
    env.pop("RAY_ADDRESS", None)
    # every port its own (the test session's Ray may hold the defaults: its agents listen on them)
    ports = [f"--{name}={_free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                     "metrics-export-port", "runtime-env-agent-port",
                                                     "node-manager-port", "object-manager-port",
                                                     "ray-client-server-port")]
    address = f"http://127.0.0.1:{dash}"
    try:  # a start that fails half-way is stopped too (its GCS may be up)
        started = subprocess.run(
            [
                os.path.join(BIN, "ray"),
                "start",
                "--head",
                f"--port={port}",
                f"--dashboard-port={dash}",
                *ports,
                "--dashboard-host=127.0.0.1",
                "--include-dashboard=true",
                "--num-cpus=2",
                "--disable-usage-stats",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert started.returncode == 0, (started.stdout + started.stderr)[-3000:]
        res = _cli(["submit", str(spec), "--address", address, "--follow", "--submission-id", "winnow-test-1"], env)
        assert res.returncode == 0, res.stderr[-2000:]
        assert "winnow curate:" in res.stdout                     # the job's own log, followed
        assert "curate job winnow-test-1" in res.stdout and "ended: SUCCEEDED" in res.stdout
        summary = json.loads((tmp_path / "out" / "summary.json").read_text())
        assert (summary["inputs"], summary["kept"], summary["rejected"]) == (13, 12, 1)
        at = {**env, "RAY_ADDRESS": address}                      # --address falls back to RAY_ADDRESS
        assert _cli(["jobs", "status", "winnow-test-1"], at).stdout.strip() == \
            "job winnow-test-1: SUCCEEDED (Job finished successfully.)"
        assert "winnow-test-1  SUCCEEDED  curate.yaml" in _cli(["jobs", "list"], at).stdout
        assert "kept" in _cli(["jobs", "logs", "winnow-test-1"], at).stdout
        assert "had already ended" in _cli(["jobs", "stop", "winnow-test-1"], at).stdout
        # a spec on the bucket naming only the bucket: the job reads and writes nothing else
        from tests.s3server import SERVER as S3

        name = S3.new_bucket()
        try:
            c = S3.client()
            for f in sorted(os.listdir(tmp_path / "images")):
                c.upload_file(str(tmp_path / "images" / f), name, f"images/{f}")
            c.put_object(Bucket=name, Key="specs/curate.yaml",
                         Body=(f"input: {{path: 's3://{name}/images'}}\noutput: {{path: 's3://{name}/out'}}\n"
                               f"stages: [{{name: decode, max_side: 32}}]\n").encode())
            res = _cli(["submit", f"s3://{name}/specs/curate.yaml", "--address", address, "--follow",
                        "--submission-id", "winnow-test-s3"], env)
            assert res.returncode == 0, res.stderr[-2000:]
            assert "curate job winnow-test-s3" in res.stdout and "ended: SUCCEEDED" in res.stdout
            summary = json.loads(c.get_object(Bucket=name, Key="out/summary.json")["Body"].read())
            assert (summary["inputs"], summary["kept"], summary["rejected"]) == (13, 12, 1)
            assert "winnow-test-s3  SUCCEEDED  curate.yaml" in _cli(["jobs", "list"], at).stdout
        finally:
            S3.drop_bucket(name)
        wrong = _cli(["jobs", "list"], {**at, "RAY_AUTH_TOKEN": token[::-1]})
        assert wrong.returncode == 1 and "token auth: set RAY_AUTH_MODE=token" in wrong.stderr   # refused, said plainly
        # a driver on this machine joins the running cluster instead of starting a second Ray
        probe = subprocess.run([sys.executable, "-c", "import ray; from pipeline import adapter; "
                                "adapter.connect(None, 1); print(int(ray.cluster_resources()['CPU']))"],
                               capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
        assert probe.returncode == 0, probe.stderr[-2000:]
        assert probe.stdout.strip().splitlines()[-1] == "2"      # the cluster's 2 CPUs, not num_cpus=1
    finally:
        _stop_cluster(port)


def test_the_kuberay_example_runs_jobs_run_on_a_spec_that_parses():
    import yaml

    from pipeline.commands import curate_spec

    config_map, rayjob = yaml.safe_load_all(open(os.path.join(ROOT, "jobs", "kuberay", "rayjob_curate.yaml")))
    assert (config_map["kind"], rayjob["kind"], rayjob["apiVersion"]) == ("ConfigMap", "RayJob", "ray.io/v1")
    assert rayjob["spec"]["entrypoint"] == "python -m jobs.run /specs/curate.yaml"
    spec = curate_spec.parse(yaml.safe_load(config_map["data"]["curate.yaml"]))
    assert [s.name for s in spec.stages] == ["decode", "metadata_filter", "phash_dedup"]
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert {"name": "spec", "mountPath": "/specs"} in head["containers"][0]["volumeMounts"]


@pytest.mark.parametrize("name,kind", [("rayjob_curate.yaml", "curate"), ("rayjob_train.yaml", "train")])
def test_the_kuberay_examples_share_nothing_but_a_bucket(name, kind):
    """No pod mounts a shared volume: every path in the spec is on object storage, and every
    container gets its credentials from the standard chain (a Secret's AWS_* variables)."""
    import yaml

    from pipeline.commands import curate_spec
    from training import train_spec

    config_map, rayjob = yaml.safe_load_all(open(os.path.join(ROOT, "jobs", "kuberay", name)))
    doc = yaml.safe_load(config_map["data"][f"{kind}.yaml"])
    spec = curate_spec.parse(doc) if kind == "curate" else train_spec.parse(doc, check_paths=False)  # a hub id
    paths = [spec.input.path, spec.output.path] if kind == "curate" else [*spec.data.shards, spec.output.path]
    assert all(p.startswith("s3://") for p in paths)
    cluster = rayjob["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        assert not [v for v in pod.get("volumes", []) if "persistentVolumeClaim" in v]
        assert {"secretRef": {"name": "winnow-s3"}} in pod["containers"][0]["envFrom"]


def test_a_job_whose_python_lacks_winnows_dependencies_says_what_to_fix(tmp_path):
    """``python -m jobs.run`` under an interpreter without pyarrow/ray/torch (a cluster started outside
    the venv) exits 3 with one line naming the interpreter, the missing module and the fixes, not a
    traceback from deep inside a command."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "pyarrow.py").write_text("raise ImportError('this cluster has no pyarrow', name='pyarrow')\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text("kind: curate\n")
    env = {**os.environ, "PYTHONPATH": f"{bare}{os.pathsep}{root}"}
    res = subprocess.run([sys.executable, "-m", "jobs.run", str(spec)], cwd=root, env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 3
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot import 'pyarrow'" in lines[0] and sys.executable in lines[0]
    assert "--installed" in lines[0] and "Traceback" not in res.stderr
