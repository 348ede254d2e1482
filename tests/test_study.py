"""``winnow study``: a short run per sweep cell, each evaluated; the table, the plot, and resuming."""
from __future__ import annotations

import json
import os

import pytest

from pipeline.contract.config import ConfigError
from tests.test_train import shards  # noqa: F401  (a fixture)


@pytest.fixture(scope="module")
def swept(shards, tmp_path_factory):  # noqa: F811
    from pipeline.commands import sweep

    out = str(tmp_path_factory.mktemp("study_sweep") / "sweep")
    sweep.run(sweep.parse({"annotations": [shards[0]], "output": out, "plots": False, "sheets": {"per_side": 0},
                           "filters": [{"column": "width", "keep": "high", "drop_fractions": [0.5]}]}))
    return out


def _doc(sweep_dir: str, shards_dir: str, out: str, **kw) -> dict:
    doc = {"kind": "study", "sweep": sweep_dir, "output": out, "cells": ["cell_000", "cell_001"],
           "train": {"data": {"shards": ["ignored"], "resolution": 64, "bucket_step": 32, "workers": 1},
                     "model": {"kind": "sd"}, "ray": {"num_workers": 1, "num_cpus": 2},
                     "train": {"batch_size": 2, "max_steps": 2, "checkpoint_every": 2, "log_every": 1,
                               "sample_prompts": [], "eval_every": 2, "eval_fraction": 0.2},
                     "output": {"path": "ignored"}},
           "train_set": ["lora.enabled=true", "lora.rank=4"],
           "eval": {"prompts": shards_dir, "reference": shards_dir, "fid_weights": "random", "num": 2, "steps": 2,
                    "size": 64}}
    doc.update(kw)
    return doc


def test_study_spec_errors_name_the_key(swept, shards, tmp_path):  # noqa: F811
    from pipeline.commands import study

    spec = study.parse(_doc(swept, shards[0], str(tmp_path / "o")))
    ts = study._train_spec(spec, "cell_001")
    assert ts.data.selection == os.path.join(swept, "selections", "cell_001.parquet")
    assert (
        ts.data.shards == [shards[0]]
        and ts.lora.enabled
        and ts.output.path == str(tmp_path / "o" / "cells" / "cell_001")
    )
    with pytest.raises(ConfigError, match=r"cells: \['cell_009'\] are not cells"):
        study.parse(_doc(swept, shards[0], str(tmp_path / "o"), cells=["cell_009"]))
    with pytest.raises(ConfigError, match="has no cells.csv"):
        study.parse(_doc(str(tmp_path), shards[0], str(tmp_path / "o")))
    with pytest.raises(ConfigError, match=r"train \(cell_000\): .*lora.rank"):
        study.parse(_doc(swept, shards[0], str(tmp_path / "o"), train_set=["lora.enabled=true", "lora.rank=0"]))
    with pytest.raises(ConfigError, match="eval.fid_weights: required"):
        study.parse(_doc(swept, shards[0], str(tmp_path / "o"),
                         eval={"prompts": shards[0], "reference": shards[0]}))
    assert study.parse(_doc(swept, shards[0], str(tmp_path / "o"), cells=None, min_kept=1)).cells == [
        "cell_000",
        "cell_001",
    ]


@pytest.mark.slow
def test_study_trains_and_scores_each_cell_then_resumes(ray_local, swept, shards, tmp_path):  # noqa: F811
    from pipeline.commands import study

    out = str(tmp_path / "study")
    spec = study.parse(_doc(swept, shards[0], out))
    first = study.run(spec, log=None)
    cells = {r["cell"]: r for r in first.rows}
    total = cells["cell_000"]["kept"]
    assert set(cells) == {"cell_000", "cell_001"} and cells["cell_001"]["kept"] == total // 2
    for r in first.rows:
        assert r["steps"] == 2 and r["fid"] > 0 and 0 <= r["clip_score"] <= 100 and r["val_loss"] > 0
        assert os.path.exists(os.path.join(r["run"], "lora", "pytorch_lora_weights.safetensors"))
    table = open(os.path.join(out, "study.md")).read().splitlines()
    assert table[0].startswith("| cell | filters | kept |") and len(table) == 6
    assert os.path.getsize(os.path.join(out, "plots", "scores_vs_kept.png")) > 1000
    metrics = os.path.join(cells["cell_001"]["run"], "metrics.jsonl")
    before = os.path.getmtime(metrics)
    again = study.run(spec, log=None)                   # finished cells: no training, the same scores
    assert os.path.getmtime(metrics) == before
    assert [(r["clip_score"], r["fid"]) for r in again.rows] == [(r["clip_score"], r["fid"]) for r in first.rows]
    assert json.load(open(os.path.join(out, "study.json")))[1]["cell"] == "cell_001"


def test_the_study_job_parses_against_a_sweep(swept, shards, tmp_path):  # noqa: F811
    from pipeline.commands import study

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = study.load(os.path.join(root, "jobs", "sweep_train_eval.yaml"), [
        f"sweep={swept}", f"output={tmp_path / 'o'}", f"eval.prompts={shards[0]}", f"eval.reference={shards[0]}",
        "cells=[cell_000,cell_001]", f"train={os.path.join(root, 'jobs', 'train_sd15.yaml')}"])
    ts = study._train_spec(spec, "cell_001")
    assert ts.lora.enabled and ts.lora.rank == 8 and ts.train.max_steps == 8 and ts.train.eval_every == 8
    assert spec.eval.fid_weights == "random" and spec.eval.num == 8


def test_a_torn_or_foreign_score_cache_is_scored_again(tmp_path):
    from pipeline.commands.study import _read_cache

    path = str(tmp_path / "study_eval.json")
    assert _read_cache(path) == {}                                   # none yet
    for text in (b'{"spec": {"a": 1}, "resu', b"\xff\xfe", b"[1, 2]", b'{"spec": {}, "result": 3}'):
        with open(path, "wb") as fh:
            fh.write(text)
        assert _read_cache(path) == {}
    with open(path, "w") as fh:
        json.dump({"spec": {"a": 1}, "result": {"clip_score": 21.5}}, fh)
    assert _read_cache(path) == {"spec": {"a": 1}, "result": {"clip_score": 21.5}}
