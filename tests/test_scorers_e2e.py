"""All four model stages end to end on a local Ray, and GPU requests on a machine without GPU."""
import glob
import json

import pyarrow.parquet as pq
import pytest

from pipeline.adapter import ResourceError, Shape, plan_job
from pipeline.commands import curate
from pipeline.commands import curate_spec as specmod
from pipeline.contract import layout
from pipeline.corpus import make_corpus
from pipeline.registry import STAGES

STAGES_ALL = ["decode",
              {"name": "clip"},
              {"name": "aesthetic"},
              {"name": "ocr", "backend": "rapidocr", "max_area_ratio": 0.05, "max_side": 512},
              {"name": "semantic_dedup", "threshold": 0.999}]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("scorers")
    expected = make_corpus(str(root), n_images=10, seed=3, bad=False, duplicates=2, max_side=640, text_images=2)
    return str(root), expected


def test_all_model_stages_end_to_end(ray_local, small_corpus, tmp_path):
    root, expected = small_corpus
    spec = specmod.parse({"input": {"path": root}, "output": {"path": str(tmp_path / "out"), "samples_per_shard": 8},
                          "ray": {"block_rows": 4}, "stages": STAGES_ALL})
    result = curate.run(spec, log=None)
    assert (result.inputs, result.kept, result.rejected) == (14, 9, 5)
    table = layout.read_annotations(str(tmp_path / "out"))
    rejected = {r["source"]: r["reject_reason"].split(":")[0] for r in table.to_pylist() if r["status"] != "kept"}
    # img_0002 is a crop of skimage's scanned "page": real printed text
    assert rejected == {"dup_00_of_img_0000.jpg": "duplicate", "dup_01_of_img_0001.jpg": "duplicate",
                        "part2/img_0002.jpg": "ocr_area_ratio", "text/poster_00.png": "ocr_area_ratio",
                        "text/poster_01.png": "ocr_area_ratio"}
    types = {f.name: str(f.type) for f in table.schema}
    assert {types[c] for c in ("clip_similarity", "aesthetic_score", "ocr_area_ratio")} == {"double"}
    assert types["ocr_text"] == "string" and "clip_image_embedding" not in types
    rows = {r["source"]: r for r in table.to_pylist()}
    for name in ("text/poster_00.png", "text/poster_01.png"):
        assert rows[name]["reject_reason"].startswith("ocr_area_ratio: ")
        assert "OPENING" in rows[name]["ocr_text"] or "SALE" in rows[name]["ocr_text"]
    dups = {s: r for s, r in rows.items() if s.startswith("dup_")}
    for source, r in dups.items():
        original = source.split("_of_")[1].replace(".jpg", "")
        assert r["reject_reason"].startswith("duplicate: clip cosine")
        assert rows[[s for s in rows if original in s and not s.startswith("dup_")][0]]["key"] == r["duplicate_of"]
    kept = [r for r in rows.values() if r["status"] == "kept"]
    assert all(r["aesthetic_score"] is not None and r["ocr_area_ratio"] is not None for r in kept)
    assert all(-1 <= r["clip_similarity"] <= 1 for r in kept if r["clip_similarity"] is not None)
    emb = pq.read_table(glob.glob(str(tmp_path / "out" / "embeddings" / "*.parquet")))
    assert emb.num_rows == 14 and emb.column_names == ["key", "clip_image_embedding", "clip_text_embedding"]
    assert str(emb.schema.field("clip_image_embedding").type) == "fixed_size_list<element: halffloat>[64]"
    assert set(result.stage_seconds) >= {"clip", "aesthetic", "ocr"}
    # the tiny CLIP and the aesthetic head have random weights: said once in the summary, summary.json
    # and the report (OCR's weights are real: no warning)
    assert [w.split(":")[0] for w in result.warnings] == ["clip", "aesthetic", "semantic_dedup"]
    assert "random weights" in result.warnings[0] and "aesthetic_score means nothing" in result.warnings[1]
    text = curate.format_summary(result)
    assert text.count("warning: ") == 3 and text.index("warning: clip") < text.index("inputs")
    assert json.load(open(tmp_path / "out" / "summary.json"))["warnings"] == result.warnings
    page = open(tmp_path / "out" / "report.html", encoding="utf-8").read()
    assert page.count('<p class="warn">warning: ') == 3 and "semantic_dedup: compares the embeddings" in page


def test_model_stages_say_when_their_filters_run_on_random_weights():
    """The notices name the filter that rejects at random; real weights (a file) give none."""
    from curation.aesthetic import AestheticConfig, AestheticScore
    from curation.clip import ClipConfig, ClipEmbed
    from curation.semantic_dedup import SemanticDedup, SemanticDedupConfig

    rnd = ClipConfig(pretrained="random", min_similarity=0.2)
    assert ClipEmbed.notices(rnd, []) == [
        "clip: winnow-tiny-clip runs on random weights (pretrained: random), so clip_similarity means nothing; "
        "min_similarity 0.2 rejects at random; give real weights in clip.pretrained"]
    assert ClipEmbed.notices(ClipConfig(model="ViT-B-32", pretrained="/w/clip.safetensors"), []) == []
    assert "min_score 5 rejects at random" in AestheticScore.notices(AestheticConfig(min_score=5.0), [("clip", rnd)])[0]
    real = ClipConfig(model="ViT-L-14", pretrained="/w/clip.safetensors")
    assert AestheticScore.notices(AestheticConfig(weights="/w/head.pth"), [("clip", real)]) == []
    assert AestheticScore.notices(AestheticConfig(weights="/w/head.pth"), [("clip", rnd)]) == [
        "aesthetic: its CLIP embeddings come from a random CLIP, so aesthetic_score means nothing"]
    assert SemanticDedup.notices(SemanticDedupConfig(), [("clip", real)]) == []
    assert len(SemanticDedup.notices(SemanticDedupConfig(), [("decode", None), ("clip", rnd)])) == 1


def test_gpu_request_without_gpu_fails_before_any_work(ray_local, small_corpus, tmp_path):
    root, _ = small_corpus
    spec = specmod.parse({"input": {"path": root}, "output": {"path": str(tmp_path / "gpu")},
                          "stages": ["decode", {"name": "clip", "device": "cuda"}]})
    with pytest.raises(ResourceError, match="stage 'clip' requests 1.0 GPU per worker but the Ray cluster has 0 GPUs"):
        curate.run(spec, log=None)
    assert not glob.glob(str(tmp_path / "gpu" / "_work" / "rows" / "*"))


def test_resource_plans():
    cfg = specmod.parse({"input": {"path": "/d"}, "output": {"path": "/o"}, "stages": STAGES_ALL}).stages
    steps = [(s.name, STAGES[s.name], s.config) for s in cfg]
    # 2 CPUs, two CPU actor pools (clip, ocr): each gets half of the CPU left after reads and writes
    two = plan_job(steps, Shape(2.0, 0.0, (2.0,))).stages
    assert (two["clip"].num_cpus, two["clip"].concurrency) == (0.5, 1)
    assert (two["ocr"].num_cpus, two["ocr"].concurrency) == (0.5, 1)
    # 16 CPUs, 4 GPUs, device auto: one GPU actor per GPU; rapidocr stays on CPU
    gpu = plan_job(steps, Shape(16.0, 4.0, (16.0,))).stages
    assert (gpu["clip"].num_gpus, gpu["clip"].concurrency) == (1.0, 4)
    assert gpu["ocr"].num_gpus == 0.0
    # one GPU, two GPU stages (clip + easyocr): half a GPU each, so both pools can start
    easy = specmod.parse({"input": {"path": "/d"}, "output": {"path": "/o"},
                          "stages": ["decode", "clip", "ocr"]}).stages
    one = plan_job([(s.name, STAGES[s.name], s.config) for s in easy], Shape(16.0, 1.0, (16.0,))).stages
    for label in ("clip", "ocr"):
        assert (one[label].num_gpus, one[label].concurrency) == (0.5, 1)
