import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from curation.phash import (
    PHashDedup,
    PHashDedupConfig,
    dedup_hashes,
    greedy_keep,
    hamming,
    near_duplicate_pairs,
    phash_bytes,
)
from pipeline.corpus import load_photos, synth_image
from pipeline.shards import TableRows


def encode(img, fmt="JPEG", **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_resized_copy_is_close_and_other_image_is_far():
    rng = np.random.default_rng(3)
    photos = load_photos()
    a = synth_image(rng, photos, 640, 480)
    b = synth_image(rng, photos, 640, 480)
    ha = phash_bytes(encode(a, quality=95))
    ha_small = phash_bytes(encode(a.resize((320, 240)), quality=70))
    ha_png = phash_bytes(encode(a, "PNG"))
    hb = phash_bytes(encode(b, quality=95))
    assert hamming(ha, ha_small) <= 4
    assert hamming(ha, ha_png) <= 4
    assert hamming(ha, hb) > 16


def test_pairs_match_brute_force():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, size=60, dtype=np.uint64)
    flips = rng.integers(0, 64, size=(60, 3))
    near = base.copy()
    for i, bits in enumerate(flips):   # each near[i] is within 3 bits of base[i]
        for bit in bits[: i % 4]:
            near[i] ^= np.uint64(1) << np.uint64(bit)
    hashes = np.concatenate([base, near])
    for d in (0, 3, 5):
        got = {tuple(p) for p in near_duplicate_pairs(hashes, d).tolist()}
        want = {(i, j) for i in range(len(hashes)) for j in range(i + 1, len(hashes))
                if hamming(int(hashes[i]), int(hashes[j])) <= d}
        assert got == want
    assert len(near_duplicate_pairs(hashes, 3)) >= 60


def test_greedy_keep_does_not_chain():
    # 0~1 and 1~2 but 0 and 2 are far: 1 duplicates 0, 2 is kept
    pairs = np.array([[0, 1], [1, 2]])
    assert greedy_keep(np.array([0, 1, 2]), pairs).tolist() == [-1, 0, -1]
    # priority puts 2 first: 1 duplicates 2, 0 kept
    assert greedy_keep(np.array([2, 1, 0]), pairs).tolist() == [-1, 2, -1]


def test_reduce_keeps_largest_copy():
    h = "0f0f0f0f0f0f0f0f"
    near = f"{int(h, 16) ^ 0b11:016x}"
    table = pa.table({"key": ["a", "b", "c", "d"], "phash": [h, near, h, "ffff0000ffff0000"],
                      "status": ["kept", "kept", "rejected", "kept"], "width": [100, 400, 800, 50],
                      "height": [100, 300, 800, 50]})
    got = PHashDedup(PHashDedupConfig(max_distance=2)).reduce(TableRows(table))
    assert got == {"a": ("duplicate: phash distance 2 to b", "b")}
    got_first = PHashDedup(PHashDedupConfig(max_distance=2, prefer="first")).reduce(TableRows(table))
    assert got_first == {"b": ("duplicate: phash distance 2 to a", "a")}
    assert PHashDedup(PHashDedupConfig(max_distance=1)).reduce(TableRows(table)) == {}


def test_stage_call_hashes_kept_rows_only():
    img = Image.new("RGB", (64, 64), "white")
    batch = {
        "image": np.array([encode(img), None], dtype=object),
        "status": np.array(["kept", "rejected"], dtype=object),
        "reject_reason": np.array([None, "x"], dtype=object),
    }
    out = PHashDedup()(batch)
    assert len(out["phash"][0]) == 16 and out["phash"][1] is None


@pytest.mark.parametrize("seed", range(6))
def test_collapsing_identical_hashes_gives_the_item_by_item_answer(seed):
    """``dedup_hashes`` (a group per distinct hash) decides as ``greedy_keep`` over every item does,
    on inputs of many exact copies, near copies (1-6 bits flipped) and unrelated hashes, for any
    priority order and distance; and 3,000 copies of one image cost one hash in the pair search."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 2 ** 63, 12, dtype=np.uint64)
    picks = base[rng.integers(0, 12, 300)]
    flips = rng.integers(0, 64, (300, 6))
    n_flip = rng.integers(0, 7, 300) * (rng.random(300) < 0.4)
    hashes = picks.copy()
    for i in range(300):
        for b in flips[i, :n_flip[i]]:
            hashes[i] ^= np.uint64(1) << np.uint64(b)
    priority = rng.permutation(300)
    for d in (0, 2, 4):
        want = greedy_keep(priority, near_duplicate_pairs(hashes, d))
        assert dedup_hashes(hashes, priority, d).tolist() == want.tolist()
    many = np.full(3000, base[0], dtype=np.uint64)
    got = dedup_hashes(many, np.arange(3000)[::-1], 4)
    assert got[2999] == -1 and (np.delete(got, 2999) == 2999).all()
