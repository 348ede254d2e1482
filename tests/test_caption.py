"""Synthetic captions: CoCa's greedy decoding on a tiny random model built in code (open_clip's
real CoCa class from a small config), the ``caption`` stage on images and clip frames, hostile
pictures, offline weights, and the spec checks."""
import io

import numpy as np
import pytest
from PIL import Image

from curation.caption import CaptionConfig, CaptionImages
from pipeline.commands import curate_spec as specmod
from pipeline.contract.config import ConfigError
from pipeline.models.captioner import CocaCaptioner, clean_text


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def pictures() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)),
            Image.new("RGB", (64, 64), (200, 10, 10)),
            Image.new("RGB", (64, 48), (0, 0, 0)),                       # all black
            Image.new("RGB", (1, 1), (255, 255, 255)),                   # one pixel
            Image.new("RGB", (30_000, 2), (10, 200, 10)),                # a 30,000-pixel-wide panorama
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))]


@pytest.fixture(scope="module")
def coca():
    return CocaCaptioner(max_new_tokens=12)


def test_captions_are_greedy_deterministic_and_independent_of_the_batch(coca):
    tensors = [coca.prepare(im) for im in pictures()]
    whole = coca.caption(tensors)
    assert len(whole) == 6 and all(isinstance(t, str) for t, _ in whole)
    assert whole == [coca.caption([t])[0] for t in tensors]                 # batch of 1 = batch of 6
    assert whole == coca.caption(tensors[::-1])[::-1]                         # order does not matter
    assert whole == CocaCaptioner(max_new_tokens=12).caption(tensors)         # a new instance, the same text
    assert len({t for t, _ in whole}) >= 3                                     # different pictures, different text
    assert {i for _, i in whole} <= {None, "empty", "max_new_tokens", "degenerate"}
    assert CocaCaptioner(max_new_tokens=12, seed=1).caption(tensors) != whole  # the seed makes the random model
    short = CocaCaptioner(max_new_tokens=3).caption(tensors)
    assert all(len(t.split()) <= 3 or i == "degenerate" for t, i in short)
    assert all(i in ("max_new_tokens", "degenerate", "empty", None) for _, i in short)


def test_weights_load_from_a_file_like_clip_weights(coca, tmp_path):
    """The real loading path: a CoCa state dict on disk (here the tiny model's own), resolved offline."""
    path = tmp_path / "coca.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in coca.model.state_dict().items()}, str(path))
    loaded = CocaCaptioner(pretrained=str(path), max_new_tokens=12)
    assert not loaded.random
    tensors = [coca.prepare(im) for im in pictures()[:3]]
    assert loaded.caption(tensors) == coca.caption(tensors)
    with pytest.raises(ConfigError, match=r"caption.pretrained: required for model 'coca_ViT-B-32'"):
        CocaCaptioner("coca_ViT-B-32")
    with pytest.raises(ConfigError, match="does not exist"):
        CocaCaptioner(pretrained=str(tmp_path / "missing.safetensors"))


def test_clean_text_keeps_every_script_and_drops_control_characters():
    assert clean_text("a\x00 cat\x1b[31m\u202e on\n\t a   mat\u200b") == "a cat[31m on a mat"
    assert clean_text("一只猫 на ковре قطة") == "一只猫 на ковре قطة"
    assert clean_text("x" * 50, limit=10) == "x" * 10


def _batch(images, frames=None):
    n = len(images)
    b = {"key": np.array([f"{i:09d}" for i in range(n)], dtype=object),
         "image": np.array([png(im) if im is not None else None for im in images], dtype=object),
         "caption": np.array(["source text"] * n, dtype=object),
         "status": np.array(["kept"] * n, dtype=object), "reject_reason": np.array([None] * n, dtype=object)}
    if frames is not None:
        b["frames"] = np.array([[png(f) for f in fs] for fs in frames] + [None] * (n - len(frames)), dtype=object)
    return b


def test_the_stage_captions_images_and_a_clips_middle_frame_and_rejects_what_it_cannot_read(coca):
    stage = CaptionImages(CaptionConfig(max_new_tokens=12, batch_size=4))
    ims = pictures()
    batch = _batch(ims + [Image.new("RGB", (8, 8))])
    batch["image"][-1] = b"\xff\xd8\xff not a jpeg"                          # truncated bytes
    batch["status"][1], batch["reject_reason"][1] = "rejected", "decode_error: earlier"
    out = stage(batch)
    want = coca.caption([coca.prepare(im) for im in ims])
    assert [out["caption_coca"][i] for i in (0, 2, 3, 4, 5)] == [want[i][0] for i in (0, 2, 3, 4, 5)]
    assert out["caption_coca"][1] is None and out["reject_reason"][1] == "decode_error: earlier"
    assert out["status"][6] == "rejected" and out["reject_reason"][6].startswith("caption_error: MediaError")
    assert list(out["caption"]) == ["source text"] * 7                         # the source caption stays
    # a clip row: the middle of its frames is captioned
    frames = [pictures()[1], pictures()[0], pictures()[2]]
    clip = stage(_batch([pictures()[3]], frames=[frames]))
    assert clip["caption_coca"][0] == want[0][0]


def test_spec_checks_fail_before_ray():
    ok = specmod.parse({"input": {"path": "/d"}, "output": {"path": "/o"},
                        "stages": ["decode", {"name": "caption", "max_new_tokens": 20}]})
    assert ok.stages[1].config.max_new_tokens == 20
    for bad, msg in (({"backends": ["vlm"]}, "vlm"),
                     ({"backends": []}, "give at least one captioner"),
                     ({"coca_model": "ViT-B-32", "coca_pretrained": "random"}, "is not a CoCa model"),
                     ({"max_new_tokens": 200}, "max_new_tokens"),
                     ({"coca_model": "coca_ViT-L-14"}, r"\(caption\).coca_pretrained: required for model")):
        with pytest.raises(ConfigError, match=msg):
            specmod.parse({"input": {"path": "/d"}, "output": {"path": "/o"},
                           "stages": ["decode", {"name": "caption", **bad}]})


def test_a_curate_run_writes_caption_columns_into_the_table_and_the_shards(ray_local, tmp_path):
    import json
    import tarfile

    from pipeline.contract import layout
    from tests.helpers import run_curate

    root = tmp_path / "in"
    root.mkdir()
    for i, im in enumerate(pictures()[:4]):
        im.save(root / f"p{i}.png")
    (root / "p0.txt").write_text("a noisy square", encoding="utf-8")
    out = str(tmp_path / "out")
    result = run_curate(str(root), out, stages=["decode", {"name": "caption", "max_new_tokens": 8}])
    assert (result.inputs, result.kept) == (4, 4)                     # a one-pixel image is captioned too
    assert [w.split(":")[0] for w in result.warnings] == ["caption"] and "noise" in result.warnings[0]
    rows = {r["source"]: r for r in layout.read_annotations(out).to_pylist()}
    assert {f.name: str(f.type) for f in layout.read_annotations(out).schema}["caption_coca"] == "string"
    coca = CocaCaptioner(max_new_tokens=8)
    for name in ("p0.png", "p1.png", "p2.png", "p3.png"):
        with Image.open(root / name) as im:
            assert rows[name]["caption_coca"] == coca.caption([coca.prepare(im)])[0][0]
    assert rows["p0.png"]["caption"] == "a noisy square"
    with tarfile.open(sorted((tmp_path / "out" / "shards").glob("*.tar"))[0]) as tf:
        docs = [json.load(tf.extractfile(m)) for m in tf if m.name.endswith(".json")]
    assert docs and all(d["caption_coca"] for d in docs)
