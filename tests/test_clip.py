"""CLIP stage: columns, ranges, filters, and every way weights load offline (tiny weights in tmp)."""
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from curation.clip import TINY_CLIP, ClipConfig, ClipEmbed, resolve_weights
from pipeline.commands import curate_spec as specmod
from pipeline.contract.config import ConfigError
from pipeline.corpus import load_photos
from pipeline.models.clip import load_model

TINY_CFG = os.path.join(os.path.dirname(__file__), "..", "pipeline", "models", "model_configs", "winnow-tiny-clip.json")


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos():
    return [Image.fromarray(p) for p in load_photos()[:4]]


@pytest.fixture(scope="module")
def tiny():
    return ClipEmbed(ClipConfig())


def batch_of(images, captions):
    n = len(images)
    return {"key": np.array([f"{i:09d}" for i in range(n)], dtype=object),
            "image": np.array([jpeg(im) if im is not None else None for im in images], dtype=object),
            "caption": np.array(captions, dtype=object),
            "status": np.array(["kept"] * n, dtype=object), "reject_reason": np.array([None] * n, dtype=object)}


def test_columns_dtypes_and_ranges(tiny, photos):
    batch = batch_of(photos[:3] + [photos[3]], ["a cat on a sofa", None, "a rocket", "x"])
    batch["status"][3], batch["reject_reason"][3] = "rejected", "decode_error: earlier"
    out = tiny(batch)
    emb, txt = out["clip_image_embedding"], out["clip_text_embedding"]
    assert emb.shape == (4, 64) and emb.dtype == np.float32 and txt.shape == (4, 64)
    assert np.allclose(np.linalg.norm(emb[:3], axis=1), 1.0, atol=1e-5)
    assert np.isnan(emb[3]).all() and np.isnan(txt[1]).all()          # rejected row, missing caption
    sims = out["clip_similarity"]
    assert sims[1] is None and sims[3] is None
    for i in (0, 2):
        assert -1.0 <= sims[i] <= 1.0 and isinstance(sims[i], float)
        assert sims[i] == pytest.approx(float(emb[i] @ txt[i]), abs=1e-6)
    assert list(out["status"]) == ["kept", "kept", "kept", "rejected"]


def test_min_similarity_and_missing_caption_reject(photos):
    stage = ClipEmbed(ClipConfig(min_similarity=0.99, missing_caption="reject"))
    out = stage(batch_of(photos[:2], ["a cat", None]))
    assert out["reject_reason"][0].startswith("clip_similarity: ") and "< 0.99" in out["reject_reason"][0]
    assert out["reject_reason"][1] == "clip_similarity: no caption"


def test_tiny_model_is_seeded_and_about_a_million_parameters():
    a, _, _ = load_model(resolve_weights(ClipConfig()), seed=0)
    b, _, _ = load_model(resolve_weights(ClipConfig()), seed=0)
    c, _, _ = load_model(resolve_weights(ClipConfig()), seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["visual.conv1.weight"], sc["visual.conv1.weight"])
    assert sum(p.numel() for p in a.parameters()) == 954_001


def _save_weights(tmp_path, fmt: str) -> str:
    model, _, _ = load_model(resolve_weights(ClipConfig()), seed=0)
    path = str(tmp_path / f"tiny.{fmt}")
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    else:
        torch.save(model.state_dict(), path)
    return path


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_weights_file_reloads_to_identical_scores(tmp_path, tiny, photos, fmt):
    path = _save_weights(tmp_path, fmt)
    loaded = ClipEmbed(ClipConfig(pretrained=path, seed=123))   # another seed: only the file can match
    a = tiny(batch_of(photos, ["a", "b", "c", "d"]))
    b = loaded(batch_of(photos, ["a", "b", "c", "d"]))
    np.testing.assert_array_equal(a["clip_image_embedding"], b["clip_image_embedding"])
    assert list(a["clip_similarity"]) == list(b["clip_similarity"])


def _hub_cache(tmp_path, repo="winnow/tiny-clip") -> str:
    """A Hugging Face hub cache laid out as huggingface_hub writes it, holding an open_clip repo."""
    cache = tmp_path / "hub"
    snap = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (cache / f"models--{repo.replace('/', '--')}" / "refs").mkdir()
    (cache / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text("a" * 40)
    with open(TINY_CFG, encoding="utf-8") as fh:
        model_cfg = json.load(fh)
    (snap / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    os.replace(_save_weights(tmp_path, "safetensors"), snap / "open_clip_model.safetensors")
    return str(cache)


def test_hub_cache_directory_loads_offline(tmp_path, monkeypatch, tiny, photos):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = _hub_cache(tmp_path)
    cfg = ClipConfig(pretrained="hf-hub:winnow/tiny-clip", cache_dir=cache, seed=5)
    resolved = resolve_weights(cfg)
    assert resolved.model_name.startswith("local-dir:") and resolved.embed_dim == 64
    a = tiny(batch_of(photos, ["a"] * 4))
    b = ClipEmbed(cfg)(batch_of(photos, ["a"] * 4))
    np.testing.assert_array_equal(a["clip_image_embedding"], b["clip_image_embedding"])
    # the snapshot folder itself works as a local open_clip folder too
    snapshot = resolved.model_name[len("local-dir:"):]
    c = ClipEmbed(ClipConfig(pretrained=snapshot))(batch_of(photos, ["a"] * 4))
    np.testing.assert_array_equal(a["clip_image_embedding"], c["clip_image_embedding"])


def test_cached_tag_resolves_to_the_file_with_the_tags_preprocessing(tmp_path):
    # the tag's file as huggingface_hub caches it (contents are not read by resolution)
    repo = "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
    snap = tmp_path / f"models--{repo.replace('/', '--')}" / "snapshots" / ("b" * 40)
    snap.mkdir(parents=True)
    (tmp_path / f"models--{repo.replace('/', '--')}" / "refs").mkdir()
    (tmp_path / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text("b" * 40)
    (snap / "open_clip_model.safetensors").write_bytes(b"x")
    got = resolve_weights(ClipConfig(model="ViT-B-32", pretrained="laion2b_s34b_b79k", cache_dir=str(tmp_path)))
    assert got.checkpoint == str(snap / "open_clip_model.safetensors") and got.embed_dim == 512
    assert got.overrides["image_mean"] == (0.48145466, 0.4578275, 0.40821073) and not got.overrides["force_quick_gelu"]


def stage_spec(**clip):
    return {"input": {"path": "/d"}, "output": {"path": "/o"}, "stages": ["decode", {"name": "clip", **clip}]}


@pytest.mark.parametrize("clip, message", [
    ({"pretrained": "/no/such/weights.bin"},
     "stages[1](clip).pretrained: weights file '/no/such/weights.bin' does not exist; put the weights on local disk"),
    ({"model": "ViT-L-14"}, "stages[1](clip).pretrained: required for model 'ViT-L-14'"),
    ({"model": "ViT-L/14x"}, "unknown open_clip model 'ViT-L/14x'; did you mean 'ViT-L-14'"),
    ({"model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k", "cache_dir": "/no/cache"},
     "tag 'laion2b_s34b_b79k' of ViT-B-32 is not cached"),
    ({"model": "ViT-B-32", "pretrained": "laion9000"}, "is neither a file nor an open_clip tag of ViT-B-32"),
    ({"pretrained": "hf-hub:nobody/nothing", "cache_dir": "/no/cache"}, "or set allow_download: true"),
    ({"device": "cpu", "precision": "fp16"}, "fp16 runs on GPU only"),
])
def test_weight_problems_fail_before_ray_with_the_key_and_path(clip, message):
    with pytest.raises(ConfigError) as err:
        specmod.parse(stage_spec(**clip))
    assert message in str(err.value)


def test_random_weights_for_a_real_architecture_need_saying_so():
    got = resolve_weights(ClipConfig(model="ViT-B-32", pretrained="random"))
    assert got.checkpoint is None and got.embed_dim == 512
    assert TINY_CLIP == resolve_weights(ClipConfig()).model_name


def test_unreadable_image_becomes_a_rejected_row(tiny, photos):
    batch = batch_of(photos[:2], ["a", "b"])
    batch["image"][1] = b"\xff\xd8 not really a jpeg"
    out = tiny(batch)
    assert out["status"].tolist() == ["kept", "rejected"]
    assert out["reject_reason"][1] == "clip_error: MediaError: decode_error: not an image"   # the bounded opener
    assert not np.isnan(out["clip_image_embedding"][0]).any() and np.isnan(out["clip_image_embedding"][1]).all()
