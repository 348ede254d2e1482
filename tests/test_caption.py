"""Synthetic captions: CoCa's greedy decoding on a tiny random model built in code (open_clip's
real CoCa class from a small config), a LLaVA-class vision-language model and a Llama summariser
built in code through transformers' real classes, the ``caption`` stage on images and clip frames,
hostile pictures, offline weights, and the spec checks."""
import io

import numpy as np
import pytest
from PIL import Image

from curation.caption import CaptionConfig, CaptionImages
from pipeline.commands import curate_spec as specmod
from pipeline.contract.config import ConfigError
from pipeline.models.captioner import CocaCaptioner, clean_text
from pipeline.models.textgen import Summarizer, VlmCaptioner, tiny_summary, tiny_vlm


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
        rows = [[png(f) for f in fs] if fs else None for fs in frames] + [None] * (n - len(frames))
        b["frames"] = np.array(rows, dtype=object)
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
    for bad, msg in (({"backends": ["summary", "coca"]}, "in the order coca, vlm, summary"),
                     ({"backends": ["coca", "coca"]}, "each captioner once"),
                     ({"backends": ["vlm"], "vlm_model": "nobody/missing-vlm"}, r"vlm_model: 'nobody/missing-vlm' is "
                      r"not in the hub cache .* allow_download"),
                     ({"backends": ["coca", "summary"], "template": "{caption_vlm}"}, r"names \['caption_vlm'\]"),
                     ({"backends": ["summary"], "template": "no fields"}, "must name caption columns"),
                     ({"backends": ["summary"], "template": "{caption"}, "template"),
                     ({"backends": ["coca"], "summary_model": "x/y"}, "summary_model is set but backends has no"),
                     ({"backends": ["coca"], "frames": 5}, "frames is set but backends has no vlm"),
                     ({"backends": ["vlm"], "template": "{caption}"}, "template is set but backends has no summary"),
                     ({"backends": ["vlm"], "top_p": 0.5}, "only shape sampling"),
                     ({"backends": ["coca"], "sample": True}, "only the vlm and summary backends sample"),
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
    result = run_curate(str(root), out, stages=["decode", {"name": "caption", "max_new_tokens": 8}],
                        output_options={"caption": "caption_coca"})
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
        texts = {m.name[:-4]: tf.extractfile(m).read().decode() for m in tf if m.name.endswith(".txt")}
    assert docs and all(d["caption_coca"] for d in docs)
    assert all(texts[d["key"]] == d["caption_coca"] for d in docs)   # output.caption: caption_coca is the .txt
    acc = json.load(open(tmp_path / "out" / "summary.json"))["captions"]["caption_coca"]
    assert (acc["rows"], acc["written"] + acc["empty"], acc["max_new_tokens"]) == (4, 4, 8)
    assert sum(acc["issues"].values()) == sum(1 for r in rows.values() if r["caption_issue"])
    assert acc["model"] == "winnow-tiny-coca (random weights)" and acc["decoding"] == "greedy"
    from pipeline.commands import report

    page = open(report.write(out), encoding="utf-8").read()
    import html
    shown = [r["caption_coca"][:120] for r in rows.values()]
    assert sum(f"<b>coca</b> {html.escape(t)}</span>" in page for t in shown) >= 1   # beside the thumbnails
    with pytest.raises(ConfigError, match="output.caption: 'caption_vlm' is not written by this run"):
        run_curate(str(root), out, stages=["decode", {"name": "caption"}],
                   output_options={"caption": "caption_vlm"})


# ---- the vision-language model and the summary, through transformers' real generation ----

@pytest.fixture(scope="module")
def vlm():
    return VlmCaptioner(max_new_tokens=10)


@pytest.fixture(scope="module")
def summary():
    return Summarizer(max_new_tokens=10)


def test_vlm_captions_pictures_and_several_frames_independently_of_the_batch(vlm):
    ims = pictures()
    rows = [vlm.prepare([im]) for im in ims] + [vlm.prepare(ims[:3]), vlm.prepare(ims[3:5])]
    assert [int(r["pixel_values"].shape[0]) for r in rows] == [1] * 6 + [3, 2]   # one image entry per frame
    whole = vlm.caption(rows)
    assert len(whole) == 8 and all(isinstance(t, str) for t, _ in whole)
    assert whole == [vlm.caption([r])[0] for r in rows]                # batch of 1 = batch of 8
    assert whole == vlm.caption(rows[::-1])[::-1]
    assert whole == VlmCaptioner(max_new_tokens=10).caption(rows)       # a new instance, the same text
    assert len({t for t, _ in whole}) >= 4
    assert whole[6] != whole[0]                                        # three frames are not the first alone
    assert all(i in (None, "max_new_tokens", "degenerate", "empty") for _, i in whole)
    assert all(len(t.split()) <= 10 for t, _ in whole)                 # a CLIP BPE token ends at most one word
    beams = VlmCaptioner(max_new_tokens=10, num_beams=2)
    assert beams.caption(rows[:4]) == [beams.caption([r])[0] for r in rows[:4]]


def test_summary_fills_its_template_and_is_independent_of_the_batch(summary):
    values = [{"caption": "a dog", "caption_coca": "a brown dog", "caption_vlm": "a dog runs on grass"},
              {"caption": None, "caption_coca": "", "caption_vlm": "<script>x</script>\x00\x1b"},
              {"caption": "一只猫 " * 400, "caption_coca": "a cat", "caption_vlm": "a cat sleeps"},
              {"caption_vlm": "short"}]
    prompt = summary.prompt(values[0])
    assert "Frame: a brown dog\nVideo: a dog runs on grass\nSource text: a dog\nCaption:" in prompt
    assert "\x00" not in summary.prompt(values[1]) and "Source text: \n" in summary.prompt(values[1])
    assert len(summary.prompt(values[2])) < 1400                           # each field cut at FIELD_CHARS
    rows = [summary.prepare(v) for v in values]
    whole = summary.caption(rows)
    assert whole == [summary.caption([r])[0] for r in rows] == summary.caption(rows[::-1])[::-1]
    assert len({t for t, _ in whole}) == 4


def test_a_model_that_emits_nothing_or_one_token_forever_is_a_counted_issue():
    import torch

    model, tok = tiny_summary(0)
    with torch.no_grad():
        model.lm_head.weight.zero_()                  # every logit 0: greedy picks token 0 every step
    s = Summarizer(max_new_tokens=8)
    s.gen.model = model
    row = [s.prepare({"caption": "a dog"})]
    assert s.caption(row) == [("!!!!!!!!", "degenerate")]
    s.gen.eos = {0}                                    # token 0 ends the text at once: nothing emitted
    assert s.caption(row) == [("", "empty")]


def test_hf_weights_load_from_a_folder_and_refuse_the_wrong_kind(vlm, summary, tmp_path):
    """The real loading path: save_pretrained folders (the tiny models' own), resolved offline."""
    model, processor = tiny_vlm(0)
    model.save_pretrained(tmp_path / "vlm")
    processor.save_pretrained(tmp_path / "vlm")
    model, tok = tiny_summary(0)
    model.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    loaded = VlmCaptioner(str(tmp_path / "vlm"), max_new_tokens=10)
    assert not loaded.random and loaded.chat
    rows = [vlm.prepare([im]) for im in pictures()[:3]]
    assert loaded.caption([loaded.prepare([im]) for im in pictures()[:3]]) == vlm.caption(rows)
    lm = Summarizer(str(tmp_path / "lm"), max_new_tokens=10)
    v = {"caption": "a dog", "caption_coca": "a brown dog", "caption_vlm": "a dog runs"}
    assert lm.caption([lm.prepare(v)]) == summary.caption([summary.prepare(v)])
    with pytest.raises(ConfigError, match=r"model_type 'llama', which is not a vision-language"):
        VlmCaptioner(str(tmp_path / "lm"))
    with pytest.raises(ConfigError, match="has no config.json"):
        Summarizer(str(tmp_path))
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text((tmp_path / "lm" / "config.json").read_text())
    with pytest.raises(ConfigError, match=r"has a config.json but no weights"):
        Summarizer(str(tmp_path / "bare"))
    with pytest.raises(ConfigError, match="not in the hub cache"):
        Summarizer("someone/absent-model", cache_dir=str(tmp_path / "hub"))


def test_three_backends_on_images_and_clips(vlm, summary):
    from curation.caption import spread

    assert spread(9, 3) == [1, 4, 7] and spread(2, 3) == [0, 1] and spread(5, 1) == [2] and spread(4, 1) == [2]
    stage = CaptionImages(CaptionConfig(backends=["coca", "vlm", "summary"], max_new_tokens=10, batch_size=3,
                                        frames=3))
    ims = pictures()
    frames = [ims[0], ims[1], ims[5]]
    batch = _batch(ims[:4] + [ims[0]], frames=[None] * 4 + [frames])
    out = stage(batch)
    coca = CocaCaptioner(max_new_tokens=10)
    for i in range(4):
        assert out["caption_coca"][i] == coca.caption([coca.prepare(ims[i])])[0][0]
        assert out["caption_vlm"][i] == vlm.caption([vlm.prepare([ims[i]])])[0][0]
        want = summary.caption([summary.prepare({"caption": "source text", "caption_coca": out["caption_coca"][i],
                                                 "caption_vlm": out["caption_vlm"][i]})])[0][0]
        assert out["caption_summary"][i] == want
    assert out["caption_coca"][4] == coca.caption([coca.prepare(ims[1])])[0][0]          # the middle frame
    assert out["caption_vlm"][4] == vlm.caption([vlm.prepare(frames)])[0][0]             # all three frames
    for issue in out["caption_issue"]:
        assert issue is None or all(p.split(":")[0] in ("coca", "vlm", "summary") for p in issue.split(", "))
    two = stage(_batch([ims[0]], frames=[[ims[2], ims[3]]]))                              # a clip of two frames
    assert two["status"][0] == "kept" and two["caption_vlm"][0] == vlm.caption([vlm.prepare(ims[2:4])])[0][0]


def test_clip_scores_against_a_caption_column_an_earlier_stage_writes():
    from curation.clip import ClipConfig, ClipEmbed
    from pipeline.models.clip import ClipModel

    stages = ["decode", {"name": "caption", "backends": ["coca"]}, {"name": "clip", "text": "caption_coca"}]
    spec = specmod.parse({"input": {"path": "/d"}, "output": {"path": "/o"}, "stages": stages})
    assert spec.stages[2].config.text == "caption_coca"
    for bad, msg in ((["decode", {"name": "clip", "text": "caption_coca"}], "written by no earlier caption stage; "),
                     (["decode", {"name": "caption"}, {"name": "clip", "text": "caption_vlm"}],
                      r"\(they write caption_coca\)")):
        with pytest.raises(ConfigError, match=msg):
            specmod.parse({"input": {"path": "/d"}, "output": {"path": "/o"}, "stages": bad})
    batch = _batch(pictures()[:3])
    batch["caption_coca"] = np.array(["a red square", None, "a black square"], dtype=object)
    out = ClipEmbed(ClipConfig(text="caption_coca"))(batch)
    clip = ClipModel()
    ims = clip.embed_images([clip.prepare(png(im)) for im in pictures()[:3]])
    texts = clip.embed_texts(["a red square", "a black square"])
    assert out["clip_similarity"][0] == pytest.approx(float(ims[0] @ texts[0]), abs=1e-5)   # fp32 dot of unit rows
    assert out["clip_similarity"][1] is None                                   # no caption_coca: no similarity
    assert out["clip_similarity"][2] == pytest.approx(float(ims[2] @ texts[1]), abs=1e-5)


@pytest.mark.slow
def test_the_dry_run_projects_the_caption_cost(ray_local, tmp_path):
    from pipeline.commands import curate

    root = tmp_path / "in"
    root.mkdir()
    for i in range(12):
        pictures()[i % 6].save(root / f"p{i:02d}.png")
    out = tmp_path / "out"
    spec = specmod.parse({"input": {"path": str(root)}, "output": {"path": str(out), "report": False},
                          "stages": ["decode", {"name": "caption", "backends": ["coca", "summary"],
                                                "template": "Caption: {caption_coca}", "max_new_tokens": 6}],
                          "dry_run": {"enabled": True, "sample": 8}})
    r = curate.run(spec, log=None)
    assert not out.exists() and r.sampled == 8
    (note,) = [n for n in r.notes if n.startswith("caption: ")]
    per_row = next(s["seconds_per_row"] for s in r.stages if s["stage"] == "caption")
    assert per_row > 0 and f"{1000 * per_row:.1f} ms per row" in note and "worker-hours for the whole input" in note


def test_sampled_captions_are_seeded_by_key_not_by_batch_or_order():
    ims = pictures()
    cfg = {"backends": ["vlm", "summary"], "max_new_tokens": 8, "sample": True, "temperature": 1.0}
    one = CaptionImages(CaptionConfig(**cfg, batch_size=1))(_batch(ims))
    many = CaptionImages(CaptionConfig(**cfg, batch_size=4))
    rev = _batch(ims[::-1])
    rev["key"] = rev["key"][::-1]                               # the same key with the same picture, reversed
    out = many(rev)
    for col in ("caption_vlm", "caption_summary"):
        assert list(out[col][::-1]) == list(one[col])
    again = many(_batch(ims))
    assert list(again["caption_vlm"]) == list(one["caption_vlm"])           # a re-run samples the same text
    greedy = CaptionImages(CaptionConfig(backends=["vlm"], max_new_tokens=8))(_batch(ims))
    reseeded = CaptionImages(CaptionConfig(**cfg, seed=1))(_batch(ims))
    assert list(greedy["caption_vlm"]) != list(one["caption_vlm"]) != list(reseeded["caption_vlm"])
    with pytest.raises(ConfigError, match="sampling and beam search"):
        specmod.parse({"input": {"path": "/d"}, "output": {"path": "/o"},
                       "stages": ["decode", {"name": "caption", **cfg, "num_beams": 2}]})


@pytest.mark.slow
def test_another_batch_size_and_worker_count_write_the_same_captions(ray_local, tmp_path):
    """A clip run's three captions do not depend on how rows were batched or spread over workers."""
    import pyarrow.compute as pc

    from pipeline.contract import layout
    from pipeline.synth import shot, write_video
    from tests.helpers import run_curate

    root = tmp_path / "videos"
    root.mkdir()
    for i in range(4):
        write_video(str(root / f"v{i}.mp4"), shot(36, 96, 64, i, motion=2.0 + i), fps=12.0, crf=20)
    cols = ["key", "caption_coca", "caption_vlm", "caption_summary", "caption_issue"]

    def captions(out, batch, workers):
        stage = {"name": "caption", "backends": ["coca", "vlm", "summary"], "max_new_tokens": 8,
                 "batch_size": batch, "workers": workers, "cpus_per_worker": 0.5}
        run_curate(str(root), str(out), stages=[{"name": "clips", "min_s": 1.0}, stage],
                   input={"format": "videos"})
        t = layout.read_annotations(str(out))
        return t.filter(pc.equal(t.column("status"), "kept")).select(cols).sort_by("key").to_pylist()

    a = captions(tmp_path / "a", 1, 1)
    b = captions(tmp_path / "b", 5, 2)
    assert len(a) == 4 and a == b
    assert all(r["caption_coca"] and r["caption_vlm"] and r["caption_summary"] for r in a)


def test_an_encoder_decoder_vlm_without_a_chat_template_sees_the_middle_frame(tmp_path):
    """BLIP-2 with a T5 decoder (tiny, built here, saved and loaded through the real path): no chat
    template, so a clip is its middle frame and the prompt; the output holds no echoed prompt and
    its decoder start token (T5's is the pad/end token) does not end the caption at once."""
    import torch
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessor,
        T5Config,
    )

    from pipeline.models.tokenizer import offline_clip_tokenizer

    tok = offline_clip_tokenizer(str(tmp_path / "tok"))
    proc = Blip2Processor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok,
                          num_query_tokens=4)
    vision = Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               image_size=32, patch_size=8)
    qformer = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                 encoder_hidden_size=32)
    text = T5Config(vocab_size=len(proc.tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
                    num_heads=4, decoder_start_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id)
    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
                         num_query_tokens=4, image_token_index=proc.tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    Blip2ForConditionalGeneration(config).save_pretrained(tmp_path / "blip2")
    proc.save_pretrained(tmp_path / "blip2")
    vlm = VlmCaptioner(str(tmp_path / "blip2"), prompt="a photo of", max_new_tokens=8)
    assert not vlm.chat and not vlm.random
    ims = pictures()
    rows = [vlm.prepare([im]) for im in ims[:3]] + [vlm.prepare(ims[:3])]
    out = vlm.caption(rows)
    assert out[3] == out[1]                                              # the clip: its middle frame
    assert all(t for t, _ in out) and out == [vlm.caption([r])[0] for r in rows]
    assert all("photo" not in t for t, _ in out)                         # the prompt is not echoed back
