"""Semantic dedup: a resized copy is rejected, a different image kept; clustering vs exact search."""
import io
import os

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from curation.clip import ClipConfig, ClipEmbed
from curation.semantic_dedup import (
    SemanticDedup,
    SemanticDedupConfig,
    embedding_matrix,
    similar_pairs,
    spherical_kmeans,
)
from pipeline.corpus import load_photos
from pipeline.shards import FragmentRows, FragmentWriter, TableRows, embedding_array


def jpeg(img):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def rows_table(keys, emb, sizes):
    return pa.table({"key": keys, "status": ["kept"] * len(keys), "width": [w for w, _ in sizes],
                     "height": [h for _, h in sizes], "clip_image_embedding": embedding_array(emb)})


def test_resized_copy_rejected_different_image_kept(tmp_path):
    photos = [Image.fromarray(p) for p in load_photos()[:4]]
    copy = photos[0].resize((photos[0].width // 2, photos[0].height // 2), Image.Resampling.BICUBIC)
    images = [photos[0], copy, *photos[1:]]
    out = ClipEmbed(ClipConfig())({"image": np.array([jpeg(im) for im in images], dtype=object)})
    keys = ["a_original", "b_copy", "c", "d", "e"]
    table = rows_table(keys, out["clip_image_embedding"], [im.size for im in images])
    # the tiny random CLIP squeezes every image into a narrow cone (different photos score 0.69-0.985
    # here); a real CLIP spreads them out, where 0.95 is a usual threshold
    got = SemanticDedup(SemanticDedupConfig(threshold=0.995)).reduce(TableRows(table, scratch=str(tmp_path)))
    assert list(got) == ["b_copy"]
    reason, dup_of = got["b_copy"]
    assert dup_of == "a_original" and reason.startswith("duplicate: clip cosine 1.000 to a_original")
    first = SemanticDedup(SemanticDedupConfig(threshold=0.995, prefer="first"))
    assert set(first.reduce(TableRows(table, scratch=str(tmp_path / "f")))) == {"b_copy"}


def planted(n=3000, dups=300, dim=32, seed=0):
    """Random unit vectors plus ``dups`` noisy copies (cosine ~0.99 to their source)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, dim))
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    src = rng.choice(n, dups, replace=False)
    noisy = base[src] + rng.normal(scale=0.02, size=(dups, dim))
    emb = np.concatenate([base, noisy / np.linalg.norm(noisy, axis=1, keepdims=True)]).astype(np.float32)
    keys = [f"{i:06d}" for i in range(len(emb))]
    sizes = [(100, 100)] * n + [(50, 50)] * dups                # copies are smaller: they are the ones dropped
    return keys, emb, sizes, {f"{n + j:06d}": f"{s:06d}" for j, s in enumerate(src)}


def test_exact_and_clustered_search_on_planted_duplicates(tmp_path):
    keys, emb, sizes, truth = planted()
    table = rows_table(keys, emb, sizes)
    exact = SemanticDedup(SemanticDedupConfig(threshold=0.95, cluster_size=10_000))
    got = exact.reduce(TableRows(table, scratch=str(tmp_path / "exact"), batch_rows=700))
    assert {k: v[1] for k, v in got.items()} == truth
    clustered = SemanticDedup(SemanticDedupConfig(threshold=0.95, cluster_size=500, sample_size=1000))
    got = clustered.reduce(TableRows(table, scratch=str(tmp_path / "k"), batch_rows=700))
    assert len(os.listdir(tmp_path / "k" / "clusters")) == 2 * 7            # 7 clusters, 2 files each
    found = {k: v[1] for k, v in got.items()}
    assert set(found.items()) <= set(truth.items())                        # no false positives
    assert len(found) == 288      # 96 %: 12 pairs fall on two sides of a boundary (isotropic data, worst case)


def test_similar_pairs_blocks_match_one_shot():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[10] = x[3]
    p1, s1 = similar_pairs(x, 0.9)
    p2, s2 = similar_pairs(x, 0.9, block_elems=60)                          # 1 row per block
    assert p1.tolist() == p2.tolist() and [3, 10] in p1.tolist()
    assert np.allclose(s1, s2)


def test_kmeans_is_seeded_and_unit_norm():
    x = np.random.default_rng(2).normal(size=(200, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    a, b = spherical_kmeans(x, 5, 10, seed=3), spherical_kmeans(x, 5, 10, seed=3)
    assert np.array_equal(a, b) and np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)


def test_embeddings_through_fragments_null_rows_and_retried_writes(tmp_path):
    emb = np.eye(4, dtype=np.float32)
    emb[2] = np.nan
    batch = {"key": np.array(["000000000", "000000001", "000000002", "000000003"], dtype=object),
             "partition": np.zeros(4, dtype=np.int64), "status": np.array(["kept"] * 4, dtype=object),
             "clip_image_embedding": emb}
    writer = FragmentWriter(str(tmp_path))
    writer(dict(batch))
    writer({k: v[:2] for k, v in batch.items()})                           # a retried task wrote rows twice
    tables = list(FragmentRows(str(tmp_path)).batches(["clip_image_embedding"]))
    keys = [k for t in tables for k in t.column("key").to_pylist()]
    assert sorted(keys) == ["000000000", "000000001", "000000002", "000000003"]
    table = pa.concat_tables(tables).sort_by("key")
    mat, valid = embedding_matrix(table.column("clip_image_embedding"))
    assert valid.tolist() == [True, True, False, True]
    assert str(table.schema.field("clip_image_embedding").type) == "fixed_size_list<element: halffloat>[4]"
    assert np.array_equal(mat[[0, 1, 3]], np.eye(4, dtype=np.float32)[[0, 1, 3]])


@pytest.mark.parametrize("threshold", [0.5])
def test_rejected_rows_are_not_candidates(tmp_path, threshold):
    emb = np.ones((3, 4), dtype=np.float32) / 2
    table = rows_table(["a", "b", "c"], emb, [(10, 10)] * 3)
    table = table.set_column(1, "status", pa.array(["kept", "rejected", "kept"]))
    got = SemanticDedup(SemanticDedupConfig(threshold=threshold)).reduce(TableRows(table, scratch=str(tmp_path)))
    assert {k: v[1] for k, v in got.items()} == {"c": "a"}


def test_decisions_do_not_depend_on_fragment_order(tmp_path):
    """A resumed run reads fragments written by two runs in another order: same rejections."""
    keys, emb, sizes, truth = planted(n=600, dups=60, dim=16, seed=4)
    writer = FragmentWriter(str(tmp_path / "work"))
    for start in range(0, len(keys), 50):
        sl = slice(start, start + 50)
        writer({"key": np.array(keys[sl], dtype=object), "partition": np.zeros(len(keys[sl]), dtype=np.int64),
                "status": np.array(["kept"] * len(keys[sl]), dtype=object),
                "width": np.array([w for w, _ in sizes[sl]]), "height": np.array([h for _, h in sizes[sl]]),
                "clip_image_embedding": emb[sl]})
    stage = SemanticDedup(SemanticDedupConfig(threshold=0.95, cluster_size=200, sample_size=300))
    forward = FragmentRows(str(tmp_path / "work"), scratch=str(tmp_path / "s1"))
    backward = FragmentRows(str(tmp_path / "work"), scratch=str(tmp_path / "s2"))
    backward.files = backward.files[::-1]
    a, b = stage.reduce(forward), stage.reduce(backward)
    assert a == b and len(a) > 50 and {k: v[1] for k, v in a.items()}.items() <= truth.items()
