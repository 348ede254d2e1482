"""kill -9 a running curate job, re-run it, and compare with an uninterrupted run."""
import glob
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import annotations, killable_env, run_curate, tar_members

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start(corpus_root, out, *extra):
    cmd = [sys.executable, "-m", "pipeline.cli", "curate", "--input", corpus_root, "--output", out,
           "--samples-per-shard", "4", "--set", "ray.block_rows=2", "--set", "ray.num_cpus=2", *extra]
    env = killable_env(ROOT)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_when(proc, pattern, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if glob.glob(pattern):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"nothing matched {pattern} within {timeout}s")


@pytest.fixture(scope="module")
def clean_run(ray_local, corpus, tmp_path_factory):
    root, _ = corpus
    out = str(tmp_path_factory.mktemp("clean") / "out")
    run_curate(root, out, samples_per_shard=4)
    return out


def outputs(out):
    df = annotations(out)
    members = tar_members(out)
    names = [n for ms in members.values() for n in ms]
    return df, members, names


@pytest.mark.parametrize("phase, pattern", [
    ("annotate", "_work/rows/*/*.parquet"),   # killed after the first fragment lands
    pytest.param("shards", "shards/*_stats.json", marks=pytest.mark.slow),   # killed after the first shard lands
])
def test_kill9_then_rerun_equals_clean_run(ray_local, corpus, clean_run, tmp_path, phase, pattern):
    root, _ = corpus
    out = str(tmp_path / "out")
    proc = start(root, out)
    assert kill_when(proc, os.path.join(out, pattern)), "the run finished before it could be killed"
    assert not os.path.exists(os.path.join(out, "summary.json"))   # it really was interrupted
    if phase == "shards":
        assert len(glob.glob(os.path.join(out, "shards", "*_stats.json"))) < 14
    assert not glob.glob(os.path.join(out, "shards", "*.tar.*"))       # no half-written shard under a final name
    run_curate(root, out, samples_per_shard=4)
    df, members, names = outputs(out)
    ref_df, ref_members, _ = outputs(clean_run)
    assert len(names) == len(set(names))                                # no sample twice
    assert members == ref_members                                       # same shards, same samples
    assert df["key"].tolist() == ref_df["key"].tolist()
    assert df["status"].tolist() == ref_df["status"].tolist()
    assert df["reject_reason"].fillna("").tolist() == ref_df["reject_reason"].fillna("").tolist()
    for name in ref_members:  # byte-identical shards
        with (
            open(os.path.join(out, "shards", name), "rb") as a,
            open(os.path.join(clean_run, "shards", name), "rb") as b,
        ):
            assert a.read() == b.read(), name


MODEL_STAGES = ["decode", "phash_dedup", {"name": "clip"}, {"name": "aesthetic"},
                {"name": "semantic_dedup", "threshold": 0.999}]


@pytest.mark.slow
def test_kill9_with_model_stages_loses_nothing(ray_local, corpus, tmp_path):
    """Embeddings live in the fragments too: a killed run resumes to the same rows and scores."""
    import numpy as np
    import pyarrow.parquet as pq
    import yaml

    root, _ = corpus
    clean = str(tmp_path / "clean")
    run_curate(root, clean, samples_per_shard=4, stages=MODEL_STAGES)
    out = str(tmp_path / "out")
    spec = {"input": {"path": root}, "output": {"path": out, "samples_per_shard": 4},
            "ray": {"block_rows": 2, "num_cpus": 2}, "stages": MODEL_STAGES}
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    env = killable_env(ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "curate", str(spec_path)], cwd=ROOT, env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert kill_when(proc, os.path.join(out, "_work/rows/*/*.parquet"))
    assert not os.path.exists(os.path.join(out, "summary.json"))          # it really was interrupted
    run_curate(root, out, samples_per_shard=4, stages=MODEL_STAGES)
    df, ref = annotations(out), annotations(clean)
    assert df["key"].tolist() == ref["key"].tolist() and df["key"].is_unique
    assert df["status"].tolist() == ref["status"].tolist()
    for col in ("clip_similarity", "aesthetic_score"):      # batches differ after a kill: equal to float noise
        assert np.allclose(df[col].to_numpy(float), ref[col].to_numpy(float), atol=1e-5, equal_nan=True)
    emb = pq.read_table(os.path.join(out, "embeddings")).sort_by("key")
    ref_emb = pq.read_table(os.path.join(clean, "embeddings")).sort_by("key")
    assert emb.column("key").to_pylist() == ref_emb.column("key").to_pylist()


@pytest.fixture(scope="module")
def laion_input(corpus, tmp_path_factory):
    """The corpus as a LAION parquet in row groups of 5 (its plan is made by Ray tasks, a piece each),
    with two URL rows; the images stay in the corpus folder (``input.base_dir``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, _ = corpus
    names = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)
    names[3:3] = ["https://example.com/a.jpg", "s3://bucket/b.jpg"]
    path = str(tmp_path_factory.mktemp("laion") / "meta.parquet")
    pq.write_table(pa.table({"url": names, "caption": [f"photo {i}" for i in range(len(names))]}), path,
                   row_group_size=5)
    return path, root


@pytest.mark.slow
def test_kill9_a_streamed_laion_parquet_run_then_rerun_equals_clean_run(ray_local, laion_input, tmp_path,
                                                                       monkeypatch):
    """A LAION parquet's plan is made by Ray tasks (``readers.StreamedParquet``): killed after its first
    fragment, the re-run leaves out the rows done, and the output equals an uninterrupted run's."""
    from pipeline import readers

    path, root = laion_input
    monkeypatch.setattr(readers, "PIECE_ROWS", 10)          # several pieces in the clean run too
    clean = str(tmp_path / "clean")
    run_curate(path, clean, samples_per_shard=4, input={"base_dir": root})
    out = str(tmp_path / "out")
    proc = start(path, out, "--set", f"input.base_dir={root}")
    assert kill_when(proc, os.path.join(out, "_work/rows/*/*.parquet")), "the run finished before it could be killed"
    assert not os.path.exists(os.path.join(out, "summary.json"))
    res = run_curate(path, out, samples_per_shard=4, input={"base_dir": root})
    import pyarrow.parquet as pq

    assert res.inputs == res.kept + res.rejected == pq.read_metadata(path).num_rows
    assert res.reasons["not_downloaded"] == 1 and res.reasons["protocol_not_allowed"] == 1
    df, members, names = outputs(out)
    ref_df, ref_members, _ = outputs(clean)
    assert len(names) == len(set(names)) and members == ref_members
    assert df["key"].tolist() == ref_df["key"].tolist() and df["key"].is_unique
    assert df["status"].tolist() == ref_df["status"].tolist()
    assert df["reject_reason"].fillna("").tolist() == ref_df["reject_reason"].fillna("").tolist()
    for name in ref_members:
        with open(os.path.join(out, "shards", name), "rb") as a, open(os.path.join(clean, "shards", name), "rb") as b:
            assert a.read() == b.read(), name
