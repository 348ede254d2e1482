"""``winnow curate --dry-run``: a spread sample, every stage run, projections, nothing written to the output."""
import json
import os

import pyarrow as pa
import pytest

from pipeline import readers
from pipeline.commands import curate_spec, dry_run
from pipeline.contract.config import ConfigError
from pipeline.contract.schema import KEY, PARTITION


def _plan(n: int, per_shard: int) -> readers.Plan:
    keys = [f"{i // per_shard:05d}{i % per_shard:04d}" for i in range(n)]
    parts = [i // per_shard for i in range(n)]
    return readers.Plan(pa.table({KEY: keys, PARTITION: pa.array(parts, pa.int64())}), "images",
                        {p: parts.count(p) for p in set(parts)})


def test_the_sample_is_spread_over_the_whole_input_and_repartitioned():
    job = _plan(1000, 100)
    s = dry_run.sample_plan(job, 10, 4)
    keys = s.table.column(KEY).to_pylist()
    assert keys[0] == "000000050" and keys[-1] == "000090050"        # the middle of each tenth: every shard
    assert sorted({k[:5] for k in keys}) == [f"{p:05d}" for p in range(10)]
    assert s.table.column(PARTITION).to_pylist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert s.counts == {0: 4, 1: 4, 2: 2}
    whole = dry_run.sample_plan(job, 5000, 100)                       # asking for more takes everything
    assert whole.num_inputs == 1000 and whole.table.column(KEY).to_pylist() == job.table.column(KEY).to_pylist()


def test_the_start_up_is_told_apart_from_the_steady_rate():
    trace = [(100.0, 0), (110.0, 8), (111.0, 16), (112.0, 24), (113.0, 32)]
    assert dry_run._annotate_model(trace) == (10.0, 8.0, 8)
    assert dry_run._annotate_model([(0.0, 0), (4.0, 16)]) == (0.0, 4.0, 0)   # one batch: no start-up to tell apart


def test_the_bottleneck_is_the_stage_with_the_least_capacity():
    table = [{"stage": "load", "capacity_rows_per_s": 50.0, "seconds_per_row": 0.001},
             {"stage": "decode", "capacity_rows_per_s": 50.0, "seconds_per_row": 0.03},
             {"stage": "clip", "capacity_rows_per_s": 80.0, "seconds_per_row": 0.0125}]
    assert dry_run.bottleneck(table) == "decode"        # fused tasks share one capacity: the costliest of them


def test_dry_run_options_are_checked_before_anything_runs(tmp_path):
    base = {"input": {"path": str(tmp_path)}, "output": {"path": str(tmp_path / "o")}}
    with pytest.raises(ConfigError, match="dry_run.sample: 2 is below the minimum 8"):
        curate_spec.parse({**base, "dry_run": {"sample": 2}})
    with pytest.raises(ConfigError, match=r"dry_run.nodes: expected whole numbers of nodes >= 1, got \[0\]"):
        curate_spec.parse({**base, "dry_run": {"nodes": [0]}})


def test_dry_run_projects_and_writes_nothing_into_the_output(ray_local, corpus, tmp_path, capsys):
    from pipeline import cli

    root, expected = corpus
    out = tmp_path / "new" / "run"                     # its parent does not exist yet either
    code = cli.main(["curate", "--input", root, "--output", str(out), "--dry-run", "--sample", "24", "--json",
                     "--set", "dry_run.nodes=[3]"])
    printed = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    assert os.listdir(tmp_path) == []               # no output folder; scratch and the parent made for it removed
    got = json.loads(printed[-1])
    assert got["inputs"] == len(expected) == 54 and got["sampled"] == 24
    assert got["sample_rows"] == 24 and got["unit"] == "inputs"
    assert set(got) >= {"projected_wall_s", "bottleneck_stage", "kept_fraction", "projected_output_bytes", "gpu_hours"}
    assert got["bottleneck_stage"] in {"load", "decode", "phash_dedup"}
    assert [s["stage"] for s in got["stages"]] == ["load", "decode", "phash_dedup"]
    assert 0.5 < got["kept_fraction"] < 1.0 and got["projected_rows"] == 54
    assert abs(sum(got["reject_fractions"].values()) - (1 - got["kept_fraction"])) < 1e-3
    assert got["projected_output_bytes"] > 100_000 and got["gpu_hours"] == 0
    assert list(got["projected_wall_s_on"]) == ["3"] and got["projected_wall_s_on"]["3"] < got["projected_wall_s"]
    assert any("phash_dedup" in n for n in got["notes"])
    # Ray's start-up is not in the projection, and the note says so (here Ray was up: the session's)
    assert got["notes"][0].startswith("not in the projection: starting or joining Ray, once per job")
    assert any("bottleneck" in line for line in printed) and "nothing written there" in printed[0]

    # the real run afterwards is untouched by the dry run; its --json line reconciles
    code = cli.main(["curate", "--input", root, "--output", str(out), "--json"])
    real = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and real["inputs"] == 54 and real["kept"] + real["rejected"] == 54
    assert "print_json" not in real and real["kept_fraction"] == round(real["kept"] / 54, 4)


def test_the_projection_from_a_measured_sample(tmp_path):
    """Start-up and steady rate from the trace, capped at an actor-pool bottleneck; shards and
    reductions per input; the rate-bound parts divided over more nodes."""
    from types import SimpleNamespace

    from pipeline.adapter import Shape
    from tests.test_adapter import AddOne, ModelStage

    spec = curate_spec.parse({"input": {"path": str(tmp_path)}, "output": {"path": str(tmp_path / "o")},
                              "stages": ["decode"]})
    steps = [("load", AddOne, None), ("model", ModelStage, None)]        # 1 task slot; 2 half-CPU actors
    result = SimpleNamespace(stage_seconds={"load": 10.0, "model": 100.0}, inputs=100, kept=80, reasons={"x": 20},
                             phases={"shards": 2.0, "reduce": 0.5})
    trace = [(0.0, 0), (5.0, 10), (10.0, 30), (15.0, 60), (20.0, 100)]  # start-up 5 s, then 6 inputs/s
    got = dry_run.project(
        spec, steps, 1000, 100, "inputs", result, trace, 1.0, 25.0, 4_000_000, Shape(2.0, 0.0, (2.0,))
    )
    assert [(s["stage"], s["kind"], s["copies"], s["capacity_rows_per_s"]) for s in got.stages] == [
        ("load", "tasks (fused)", 1, 10.0), ("model", "actors", 2, 2.0)]
    assert got.bottleneck_stage == "model"
    # 6 inputs/s measured, but the model pool allows 2: 5 + 990 / 2 = 500 s; shards 20, reduce 5, plan 1
    assert got.projected_phases_s == {"plan": 1.0, "annotate_startup": 5.0, "reduce": 5.0, "annotate": 495.0,
                                      "shards": 20.0}
    assert got.projected_wall_s == 526.0
    assert got.projected_wall_s_on == {2: 268.5, 4: 139.8, 10: 62.5}
    assert (got.kept_fraction, got.reject_fractions, got.projected_rows, got.projected_kept) == (
        0.8,
        {"x": 0.2},
        1000,
        800,
    )
    assert got.projected_output_bytes == 40_000_000 and got.gpu_hours == 0
