"""winnow select (materialise a selection), training from a selection, and the HTML report."""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.commands import report, sweep
from pipeline.commands import select as selection
from pipeline.contract.config import ConfigError
from pipeline.contract.stage import reason_counts
from tests.helpers import annotations, killable_env, run_curate, tar_members
from tests.test_kill_resume import ROOT, kill_when

STAGES = ["decode", "phash_dedup", "clip", "aesthetic"]


@pytest.fixture(scope="module")
def run_dir(ray_local, corpus, tmp_path_factory):
    root, _ = corpus
    out = str(tmp_path_factory.mktemp("sel") / "run")
    result = run_curate(root, out, samples_per_shard=8, stages=STAGES, output_options={"report": True})
    assert result.report == os.path.join(out, "report.html")      # curate writes its report at the end
    return out


@pytest.fixture(scope="module")
def manifest(run_dir, tmp_path_factory):
    """The sweep cell 'drop the bottom half by aesthetic score'."""
    out = str(tmp_path_factory.mktemp("sweep") / "s")
    spec = sweep.parse({"annotations": [run_dir], "output": out, "plots": False, "sheets": {"per_side": 0},
                        "filters": [{"column": "aesthetic_score", "drop_fractions": [0.5]}]})
    r = sweep.run(spec)
    assert r.cells[1].name.endswith("(drop0.5)")
    return os.path.join(out, "selections", "cell_001.parquet")


def members_by_key(out: str) -> dict[str, dict[str, bytes]]:
    got: dict[str, dict[str, bytes]] = {}
    for tar in sorted(glob.glob(os.path.join(out, "shards", "*.tar"))):
        with tarfile.open(tar) as tf:
            for m in tf:
                key, _, ext = m.name.rpartition(".")
                got.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return got


def test_select_keeps_exactly_the_manifest_keys(run_dir, manifest, tmp_path):
    out = str(tmp_path / "picked")
    spec = selection.parse({"selection": manifest, "output": {"path": out, "samples_per_shard": 3}})
    assert spec.runs == [os.path.abspath(run_dir)]          # read from the manifest
    result = selection.run(spec, log=None)
    want = sorted(pq.read_table(manifest).column("key").to_pylist())
    kept = annotations(run_dir).query("status == 'kept'")
    assert result.source_kept == len(kept) == 46
    assert len(want) == result.selected == 23                   # drop the bottom half of 46 distinct scores
    df = annotations(out)
    assert sorted(df["key"]) == want and df["key"].is_unique
    assert result.shards == 8 and df["partition"].tolist() == [i // 3 for i in range(23)]
    assert (df["status"] == "kept").all() and (df["source_run"] == os.path.abspath(run_dir)).all()
    # every member byte-identical to the source shard's, and nothing else in the tars
    src, got = members_by_key(run_dir), members_by_key(out)
    assert sorted(got) == want
    for key in want:
        assert set(got[key]) == {"jpg", "txt", "json"}
        assert got[key] == src[key]
    # per-shard annotation parquet = the tar's samples; embeddings follow the samples
    for p in range(8):
        part = pq.read_table(os.path.join(out, "shards", f"{p:05d}.parquet")).column("key").to_pylist()
        with tarfile.open(os.path.join(out, "shards", f"{p:05d}.tar")) as tf:
            assert sorted({n.rpartition(".")[0] for n in tf.getnames()}) == part
    emb = pq.read_table(os.path.join(out, "embeddings"))
    assert sorted(emb.column("key").to_pylist()) == want
    src_emb = pq.read_table(os.path.join(run_dir, "embeddings")).to_pandas().set_index("key")
    e = emb.to_pandas().set_index("key")
    assert np.array_equal(np.stack(e.loc[want[0], "clip_image_embedding"]),
                          np.stack(src_emb.loc[want[0], "clip_image_embedding"]))
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["kind"] == "selection" and summary["inputs"] == summary["kept"] == 23
    assert summary["selection"]["manifest"]["thresholds"]["aesthetic_score"]["drop_fraction"] == 0.5
    assert os.path.exists(os.path.join(out, "report.html"))
    # a re-run is a no-op; another selection into the same folder is refused
    again = selection.run(
        selection.parse({"selection": manifest, "output": {"path": out, "samples_per_shard": 3}}), log=None
    )
    assert again.selected == 23
    with pytest.raises(ConfigError, match="different spec"):
        selection.run(
            selection.parse({"selection": manifest, "output": {"path": out, "samples_per_shard": 4}}), log=None
        )


def test_inline_filters_equal_the_sweep_cell(run_dir, manifest, tmp_path):
    """drop_fractions inline resolve to the sweep's threshold, so they select the same samples."""
    spec = selection.parse({"runs": [run_dir], "output": {"path": str(tmp_path / "o"), "report": False},
                         "filters": [{"column": "aesthetic_score", "drop_fractions": [0.5]}]})
    p = selection.plan(spec)
    assert sorted(p.table.column("key").to_pylist()) == sorted(pq.read_table(manifest).column("key").to_pylist())
    assert p.thresholds["filters"][0]["keep"] == "high"
    # a text measure on a caption column: the samples whose source caption has 2 words or more
    spec = selection.parse({"runs": [run_dir], "output": {"path": str(tmp_path / "o2"), "report": False},
                            "filters": [{"column": "words(caption)", "thresholds": [2]}]})
    ann = annotations(run_dir)
    kept = ann[ann["status"] == "kept"]
    want = sorted(k for k, c in zip(kept["key"], kept["caption"], strict=True) if len(str(c or "").split()) >= 2)
    assert sorted(selection.plan(spec).table.column("key").to_pylist()) == want and want


def test_select_bad_specs(run_dir, manifest, tmp_path):
    out = {"path": str(tmp_path / "o")}
    with pytest.raises(ConfigError, match="give selection"):
        selection.parse({"runs": [run_dir], "output": out})
    with pytest.raises(ConfigError, match="one level per filter"):
        selection.parse({"runs": [run_dir], "output": out,
                      "filters": [{"column": "aesthetic_score", "drop_fractions": [0.25, 0.5]}]})
    with pytest.raises(ConfigError, match="keep: high or keep: low"):
        selection.parse({"runs": [run_dir], "output": out, "filters": [{"column": "width", "thresholds": [10]}]})
    with pytest.raises(ConfigError, match="not a finished"):
        selection.parse({"runs": [str(tmp_path)], "output": out, "filters": [{"column": "width", "keep": "high",
                                                                              "thresholds": [10]}]})
    with pytest.raises(ConfigError, match="empty"):
        selection.plan(selection.parse({"runs": [run_dir], "output": out,
                                  "filters": [{"column": "width", "keep": "high", "thresholds": [1e9]}]}))
    # a manifest naming a key the run does not keep (a rejected one)
    rejected = annotations(run_dir).query("status == 'rejected'")["key"].iloc[0]
    t = pq.read_table(manifest)
    bad = str(tmp_path / "bad.parquet")
    pq.write_table(t.from_pylist(t.to_pylist() + [{"run": 0, "key": rejected}], schema=t.schema), bad)
    with pytest.raises(ConfigError, match="1 of its 24 keys are not kept"):
        selection.plan(selection.parse({"selection": bad, "output": out}))


def test_select_survives_kill9(run_dir, manifest, tmp_path):
    clean = str(tmp_path / "clean")
    selection.run(selection.parse({"selection": manifest, "output": {"path": clean, "samples_per_shard": 1,
                                                               "report": False}}), log=None)
    out = str(tmp_path / "out")
    spec_path = tmp_path / "select.yaml"
    spec_path.write_text(yaml.safe_dump({"selection": manifest, "ray": {"num_cpus": 1},
                                         "output": {"path": out, "samples_per_shard": 1, "report": False}}))
    env = killable_env(ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "select", str(spec_path)], cwd=ROOT, env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert kill_when(proc, os.path.join(out, "shards", "*_stats.json")), "select finished before it could be killed"
    assert not os.path.exists(os.path.join(out, "summary.json"))        # it really was interrupted
    done_before = len(glob.glob(os.path.join(out, "shards", "*_stats.json")))
    assert 1 <= done_before < 23
    result = selection.run(selection.parse(yaml.safe_load(spec_path.read_text())), log=None)
    assert result.selected == 23
    assert tar_members(out) == tar_members(clean)                       # same shards, same samples
    names = [n for ms in tar_members(out).values() for n in ms]
    assert len(names) == len(set(names)) == 69                          # none twice, none lost
    for tar in glob.glob(os.path.join(clean, "shards", "*.tar")):       # byte-identical
        with open(tar, "rb") as a, open(os.path.join(out, "shards", os.path.basename(tar)), "rb") as b:
            assert a.read() == b.read()
    assert annotations(out)["key"].tolist() == annotations(clean)["key"].tolist()


def test_training_index_from_selection(run_dir, manifest, tmp_path):
    """data.selection trains on the manifest's samples without materialising them."""
    from training.index import load_index

    index = load_index([run_dir], str(tmp_path), selection=manifest)
    assert sorted(index.column("key").to_pylist()) == sorted(pq.read_table(manifest).column("key").to_pylist())
    other = str(tmp_path / "copy")
    shutil.copytree(run_dir, other)
    with pytest.raises(ConfigError, match="none of them"):
        load_index([other], str(tmp_path), selection=manifest)


def test_report_has_every_section(run_dir, tmp_path):
    path = report.write(run_dir, str(tmp_path / "r.html"), examples=4)
    page = open(path, encoding="utf-8").read()
    for sid in ("funnel", "scores", "aspect", "throughput", "examples", "shards", "spec"):
        assert f'<section id="{sid}">' in page
    assert "This section failed" not in page
    assert "http://" not in page and "https://" not in page and "<script" not in page    # self-contained
    df = annotations(run_dir)
    kept, n = int((df["status"] == "kept").sum()), len(df)
    assert f"<b>{n:,}</b><span>inputs samples" in page and f"<b>{kept:,}</b><span>kept samples" in page
    reasons = reason_counts(r for r in df["reject_reason"] if isinstance(r, str))
    assert {"decode_error", "duplicate", "decompression_bomb"} <= set(reasons)
    for reason, count in reasons.items():                               # every reason: its examples and its count
        assert f"rejected: {reason} ({count:,})" in page
    assert page.count('alt="funnel"') == 1 and page.count('alt="score histograms"') == 1
    assert page.count("data:image/jpeg;base64,") >= 4 + 3                 # kept examples + rejected ones
    assert "aesthetic_score" in page and "base 512:" in page


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium is not installed")
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    from PIL import Image

    def screenshot(url: str, shot: str) -> None:
        subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2400", "--hide-scrollbars",
                        f"--screenshot={shot}", url], check=True, timeout=120, capture_output=True)

    shot = str(tmp_path / "shot.png")
    try:
        screenshot("file://" + os.path.join(run_dir, "report.html"), shot)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        try:   # a browser that cannot render an empty page either is this machine's problem, not the report's
            screenshot("data:text/html,<p>x</p>", str(tmp_path / "blank.png"))
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"chromium cannot render here: {exc}")
        raise
    im = np.asarray(Image.open(shot).convert("RGB"))
    assert im.shape == (2400, 1280, 3)
    assert (im[:80].mean(axis=2) < 60).mean() > 0.5                     # the dark header rendered
    assert len(np.unique(im.reshape(-1, 3)[::97], axis=0)) > 200        # plots and thumbnails, not a blank page


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_member_scan_and_copy_match_tarfile(tmp_path, fmt):
    """The header scanner reads winnow's USTAR shards directly and other archives through tarfile;
    either way a copied sample reads back byte-identical, under its old or a new key."""
    import io

    long_key = "k" * (120 if fmt != tarfile.USTAR_FORMAT else 60)
    members = {"000000001": {"jpg": b"\xff\xd8" + bytes(range(256)) * 3, "txt": "caption é".encode(),
                             "json": b'{"key": "000000001"}'},
               long_key: {"png": b"\x89PNG" + b"\x01" * 1000, "txt": b""}}
    path = str(tmp_path / "src.tar")
    with tarfile.open(path, "w", format=fmt) as tf:
        d = tarfile.TarInfo("a_folder")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for key, exts in members.items():
            for ext, data in exts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    found = selection.scan_members(path, set(members) | {"absent"})
    assert sorted(found) == sorted(members)
    for key, exts in members.items():
        assert [m.ext for m in found[key]] == list(exts)
        with open(path, "rb") as fh:
            for m in found[key]:
                fh.seek(m.data)
                assert fh.read(m.size) == exts[m.ext]
    for new_key in ("000000001", "r01_000000001"):
        with open(path, "rb") as fh:
            blob = b"".join(selection._sample_chunks(fh, "000000001", new_key, found["000000001"]))
        blob += selection.tars.end(len(blob))
        assert len(blob) % tarfile.RECORDSIZE == 0
        with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
            got = {m.name: tf.extractfile(m).read() for m in tf}
        assert got[f"{new_key}.jpg"] == members["000000001"]["jpg"] and set(got) == {f"{new_key}.{e}" for e in
                                                                                     ("jpg", "txt", "json")}
        assert json.loads(got[f"{new_key}.json"])["key"] == new_key


def test_two_runs_with_colliding_keys_get_prefixed(run_dir, tmp_path):
    """Two runs share key names: output keys become rNN_KEY, the JSON row and source_key say where
    each came from, and the training index reads the new shard set."""
    from training.index import index_shard

    twin = str(tmp_path / "twin")
    shutil.copytree(run_dir, twin)
    out = str(tmp_path / "both")
    result = selection.run(selection.parse({"runs": [run_dir, twin], "output": {"path": out, "report": False},
                                            "filters": [{"column": "width", "keep": "high", "thresholds": [0]}]}),
                           log=None)
    df = annotations(out)
    kept = annotations(run_dir).query("status == 'kept'")["key"].tolist()
    assert result.selected == 2 * len(kept) == 92
    assert df["key"].tolist() == sorted([f"r00_{k}" for k in kept] + [f"r01_{k}" for k in kept])
    assert df["source_key"].tolist() == kept + kept
    assert df["source_run"].tolist() == [os.path.abspath(run_dir)] * 46 + [os.path.abspath(twin)] * 46
    got = members_by_key(out)
    assert json.loads(got[f"r01_{kept[0]}"]["json"])["key"] == f"r01_{kept[0]}"
    assert got[f"r01_{kept[0]}"]["jpg"] == members_by_key(run_dir)[kept[0]]["jpg"]
    index = index_shard(os.path.join(out, "shards", "00000.tar"))
    assert index.num_rows == 92 and index.column("key").to_pylist()[0] == f"r00_{kept[0]}"


def _table_run(root, name: str, files: dict[int, list[tuple[str, str, float]]]) -> str:
    """A run folder of annotation tables only: {partition: [(key, status, score)]}."""
    import pyarrow as pa

    run = os.path.join(root, name)
    os.makedirs(os.path.join(run, "shards"))
    for p, rows in files.items():
        pq.write_table(pa.table({"key": [k for k, _, _ in rows], "partition": [p] * len(rows),
                                 "status": [s for _, s, _ in rows], "aesthetic_score": [v for _, _, v in rows]}),
                       os.path.join(run, "shards", f"{p:05d}.parquet"))
    return run


def test_the_plan_reads_file_by_file_and_matches_a_cut_of_the_whole_table(tmp_path):
    """Three shard tables with rejected rows, keys out of order inside a file: the plan is the kept
    rows past the cut, sorted by (run, partition, key), the drop fraction a quantile over every file;
    the fingerprint follows the selection; a key that would name a path is refused before anything
    is written; a manifest key no run keeps is named."""
    rng = np.random.default_rng(3)
    files = {p: [(f"{p}{k:05d}", "rejected" if k % 4 == 0 else "kept", float(rng.uniform(0, 10)))
                 for k in rng.permutation(40)] for p in range(3)}
    run = _table_run(tmp_path, "run", files)
    out = {"path": str(tmp_path / "o"), "samples_per_shard": 16}

    def plan(**kw):
        return selection.plan(selection.parse({"runs": [run], "output": out, **kw}))

    p = plan(filters=[{"column": "aesthetic_score", "drop_fractions": [0.5]}])
    kept = [(k, v, part) for part, rows in files.items() for k, s, v in rows if s == "kept"]
    cut = sorted(v for _, v, _ in kept)[len(kept) // 2]
    want = sorted((part, k) for k, v, part in kept if v >= cut)
    assert p.source_kept == 90 and p.table.num_rows == len(want) == 45
    assert list(zip(p.table.column("partition").to_pylist(), p.table.column("key").to_pylist(), strict=True)) == want
    assert p.table.column("out_key").to_pylist() == [k for _, k in want]
    assert p.counts == {0: 16, 1: 16, 2: 13}
    assert p.thresholds["filters"][0]["threshold"] == cut
    assert plan(filters=[{"column": "aesthetic_score", "drop_fractions": [0.5]}]).fingerprint == p.fingerprint
    assert plan(filters=[{"column": "aesthetic_score", "drop_fractions": [0.25]}]).fingerprint != p.fingerprint

    hostile = _table_run(tmp_path, "hostile", {0: [("000001", "kept", 5.0), ("..x", "kept", 6.0),
                                                   ("a/b", "rejected", 7.0)]})
    with pytest.raises(ConfigError, match=r"the key '\.\.x' holds '\.\.'"):
        selection.plan(selection.parse({"runs": [hostile], "output": out,
                                        "filters": [{"column": "aesthetic_score", "thresholds": [0]}]}))
    quiet = _table_run(tmp_path, "quiet", {0: [("000001", "kept", 5.0), ("a/b", "rejected", 7.0)]})
    assert selection.plan(selection.parse({"runs": [quiet], "output": out,    # a rejected row never names a member
                                           "filters": [{"column": "aesthetic_score", "thresholds": [0]}]})) \
        .table.column("key").to_pylist() == ["000001"]
    import pyarrow as pa

    man = str(tmp_path / "man.parquet")
    pq.write_table(pa.table({"run": pa.array([0, 0], pa.int32()), "key": [want[0][1], "0nokey"]}), man)
    with pytest.raises(ConfigError, match=r"1 of its 2 keys are not kept samples .* run\|key 0\|0nokey"):
        selection.plan(selection.parse({"runs": [run], "selection": man, "output": out}))


def test_the_report_of_a_large_run_plots_a_sample_and_counts_every_row(tmp_path, monkeypatch):
    """Past REPORT_ROWS the report reads a seeded uniform sample for its plots and examples, and
    still counts every row: the funnel's kept / rejected and each reason are exact."""
    import pyarrow as pa

    rng = np.random.default_rng(5)
    run = os.path.join(tmp_path, "big")
    os.makedirs(os.path.join(run, "shards"))
    reasons = ["too_small: 90x60", "duplicate", "decode_error: truncated file"]
    want = {"kept": 0, "too_small": 0, "duplicate": 0, "decode_error": 0}
    for p in range(3):
        status = rng.choice(["kept", "rejected"], 400, p=[0.7, 0.3])
        why = [reasons[int(rng.integers(3))] if s == "rejected" else None for s in status]
        want["kept"] += int((status == "kept").sum())
        for w in why:
            if w:
                want[w.split(":")[0]] += 1
        pq.write_table(pa.table({"key": [f"{p}{k:05d}" for k in range(400)], "partition": [p] * 400,
                                 "status": status, "reject_reason": why, "aesthetic_score": rng.normal(5, 1, 400),
                                 "caption": [f"caption {p}-{k}" for k in range(400)]}),
                       os.path.join(run, "shards", f"{p:05d}.parquet"))
    table, counts = report.read_bounded(run, ["key", "status", "reject_reason", "aesthetic_score"], limit=300)
    assert counts["rows"] == 1200 and counts["kept"] == want["kept"]
    assert sum(c for r, c in counts["reasons"].items() if r.startswith("duplicate")) == want["duplicate"]
    assert 240 <= table.num_rows <= 360                       # ~300 of 1,200, binomial spread
    keys = table.column("key").to_pylist()
    assert keys == sorted(keys)
    again, _ = report.read_bounded(run, ["key"], limit=300)
    assert again.column("key").to_pylist() == keys             # seeded: the same sample every time
    monkeypatch.setattr(report, "REPORT_ROWS", 300)
    monkeypatch.setattr(report.read_bounded, "__defaults__", (300, 0))
    page = open(report.write(run, os.path.join(tmp_path, "r.html"))).read()
    assert f"<b>{want['kept']:,}</b><span>kept" in page and "<b>1,200</b><span>inputs" in page
    assert f"kept ({want['kept']:,})" in page
    assert f"rejected: duplicate ({want['duplicate']:,})" in page
    assert "from a uniform sample of" in page
    assert sum(page.count(f"caption {p}-") for p in range(3)) == 8      # the examples' captions, read by key
