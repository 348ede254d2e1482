"""``winnow curate --dry-run``: a spread sample, every stage run, projections, nothing written to the output."""
import json
import os

import pyarrow as pa
import pytest

from pipeline import readers
from pipeline.commands import curate, curate_spec, dry_run
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
    assert any("bottleneck" in line for line in printed) and "nothing written there" in printed[0]

    # the real run afterwards is untouched by the dry run; its --json line reconciles
    code = cli.main(["curate", "--input", root, "--output", str(out), "--json"])
    real = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and real["inputs"] == 54 and real["kept"] + real["rejected"] == 54
    assert "print_json" not in real and real["kept_fraction"] == round(real["kept"] / 54, 4)
