"""Output ownership: overwrite deletes only what winnow wrote; outputs never overlap inputs."""
from __future__ import annotations

import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.contract.config import ConfigError
from pipeline.contract.layout import OWNER_FILE, check_separate, claim_output

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRIES = ["spec.yaml", "shards", "summary.json"]


def _tree(root: str) -> dict[str, bytes]:
    out = {}
    for d, _, fs in os.walk(root):
        for f in fs:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


def _claim(out, fp, overwrite=False, **kw):
    claim_output(out, os.path.join(out, "spec.yaml"), fp, {"x": 1}, overwrite, "run", "input", ENTRIES, "curate", **kw)


def _fill(out):
    os.makedirs(os.path.join(out, "shards"), exist_ok=True)
    open(os.path.join(out, "shards", "00000.tar"), "wb").write(b"tar")
    open(os.path.join(out, "summary.json"), "w").write("{}")
    open(os.path.join(out, ".summary.json.0123abcd.tmp"), "w").write("{")   # a kill mid-write


def test_a_users_folder_with_a_spec_yaml_is_never_deleted(tmp_path):
    out = str(tmp_path / "mine")
    os.makedirs(out)
    open(os.path.join(out, "spec.yaml"), "w").write("fingerprint: abc\nnotes: my own spec\n")
    open(os.path.join(out, "notes.txt"), "w").write("do not delete")
    before = _tree(out)
    with pytest.raises(ConfigError, match="and no .winnow/owner.json says which files are winnow.s"):
        _claim(out, "other", overwrite=True)
    assert _tree(out) == before


def test_overwrite_refuses_and_lists_files_winnow_did_not_write(tmp_path):
    out = str(tmp_path / "run")
    _claim(out, "fp1")
    _fill(out)
    open(os.path.join(out, "notes.txt"), "w").write("mine")
    os.makedirs(os.path.join(out, "photos"))
    before = _tree(out)
    with pytest.raises(ConfigError, match=r"holds files winnow did not write \('notes.txt', 'photos'\)"):
        _claim(out, "fp2", overwrite=True)
    assert _tree(out) == before
    with pytest.raises(ConfigError, match="made by a different spec"):
        _claim(out, "fp2")


def test_overwrite_deletes_exactly_what_the_run_wrote(tmp_path):
    out = str(tmp_path / "run")
    _claim(out, "fp1")
    _fill(out)
    _claim(out, "fp1")                             # same spec: resume, nothing deleted
    assert "shards/00000.tar" in _tree(out)
    _claim(out, "fp2", overwrite=True)
    assert sorted(_tree(out)) == [OWNER_FILE, "spec.yaml"]
    assert "fp2" in open(os.path.join(out, "spec.yaml")).read()


def test_a_symlink_in_the_output_is_removed_not_followed(tmp_path):
    out = str(tmp_path / "run")
    _claim(out, "fp1")
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "precious.jpg").write_bytes(b"x")
    os.symlink(str(target), os.path.join(out, "shards"))
    _claim(out, "fp2", overwrite=True)
    assert (target / "precious.jpg").read_bytes() == b"x" and not os.path.lexists(os.path.join(out, "shards"))


@pytest.mark.parametrize("layout, message", [
    ("same", "is the same folder as input.path"),
    ("out_in_input", "lies inside input.path"),
    ("input_in_out", "lies inside output.path"),
])
def test_output_and_input_must_not_overlap(tmp_path, layout, message):
    data = tmp_path / "data"
    data.mkdir()
    out, inp = {"same": (data, data), "out_in_input": (data / "out", data),
                "input_in_out": (tmp_path, data)}[layout]
    with pytest.raises(ConfigError, match=message):
        check_separate(str(out), {"input.path": str(inp)})
    # through a symlink too
    link = tmp_path / "link"
    os.symlink(str(data), str(link))
    with pytest.raises(ConfigError):
        check_separate(str(link), {"input.path": str(data)})


def test_curate_into_its_own_input_is_refused_before_reading(tmp_path):
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (32, 32)).save(photos / "a.jpg")
    open(photos / "spec.yaml", "w").write("fingerprint: x\n")
    before = _tree(str(photos))
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "curate",
            "--input",
            str(photos),
            "--output",
            str(photos),
            "--set",
            "output.overwrite=true",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and "is the same folder as input.path" in res.stderr, res.stderr
    assert _tree(str(photos)) == before


def test_select_train_and_sweep_refuse_overlapping_outputs(tmp_path):
    from pipeline.commands import select as selection
    from pipeline.commands import sweep
    from training import train_spec as trainspec

    run = tmp_path / "run"
    (run / "shards").mkdir(parents=True)
    pq.write_table(pa.table({"key": ["0"], "status": ["kept"], "aesthetic_score": [1.0]}), run / "annotations.parquet")
    with pytest.raises(ConfigError, match=r"lies inside runs\[0\]"):
        selection.parse({"runs": [str(run)], "output": {"path": str(run / "sub")},
                         "filters": [{"column": "aesthetic_score", "thresholds": [0.5]}]})
    with pytest.raises(ConfigError, match=r"lies inside annotations\[0\]"):
        sweep.run(sweep.parse({"annotations": [str(run)], "output": str(run / "sweep"),
                               "filters": [{"column": "aesthetic_score", "thresholds": [0.5]}]}))
    from pipeline.commands.train import prepare_output
    spec = trainspec.load(None, [f"data.shards=[{run}]", f"output.path={run}"])
    with pytest.raises(ConfigError, match=r"is the same folder as data.shards\[0\]"):
        prepare_output(spec)


def test_a_smaller_sweep_leaves_no_stale_manifests(tmp_path):
    from pipeline.commands import sweep

    table = tmp_path / "annotations.parquet"
    pq.write_table(pa.table({"key": [f"{i:04d}" for i in range(100)], "status": ["kept"] * 100,
                             "aesthetic_score": [float(i) for i in range(100)]}), table)
    out = str(tmp_path / "sweep")

    def spec(fractions, **kw):
        return sweep.parse({"annotations": [str(table)], "output": out, "plots": False, "sheets": {"per_side": 0},
                            "filters": [{"column": "aesthetic_score", "drop_fractions": fractions}], **kw})

    sweep.run(spec([0.1, 0.2, 0.3, 0.4]))
    assert len(os.listdir(os.path.join(out, "selections"))) == 5
    open(os.path.join(out, "my_notes.md"), "w").write("keep me")
    with pytest.raises(ConfigError, match="made by a different spec"):
        sweep.run(spec([0.5]))
    with pytest.raises(ConfigError, match=r"did not write \('my_notes.md'\)"):
        sweep.run(spec([0.5], overwrite=True))
    os.remove(os.path.join(out, "my_notes.md"))
    sweep.run(spec([0.5], overwrite=True))
    assert sorted(os.listdir(os.path.join(out, "selections"))) == ["cell_000.parquet", "cell_001.parquet"]
    assert pq.read_table(os.path.join(out, "selections", "cell_001.parquet")).num_rows == 50
    sweep.run(spec([0.5]))                         # the same spec again: redone, same files
    assert sorted(os.listdir(os.path.join(out, "selections"))) == ["cell_000.parquet", "cell_001.parquet"]
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
