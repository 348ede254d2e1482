import os

import pytest

from pipeline.commands import curate_spec as specmod
from pipeline.contract.config import ConfigError, apply_overrides


def base(**extra):
    data = {"input": {"path": "/data"}, "output": {"path": "/out"}}
    data.update(extra)
    return data


def test_defaults_and_stage_labels():
    spec = specmod.parse(base(stages=[{"name": "metadata_filter", "min_side": 512}, "decode",
                                      {"name": "metadata_filter", "max_aspect_ratio": 2.5}, "phash_dedup"]))
    assert [s.label for s in spec.stages] == ["metadata_filter", "decode", "metadata_filter_2", "phash_dedup"]
    assert spec.stages[0].config.min_side == 512
    assert spec.stages[2].config.max_aspect_ratio == 2.5
    assert spec.output.samples_per_shard == 1000
    assert specmod.parse(base()).stages[0].name == "decode"


def test_sd1_recipe_is_expressible():
    spec = specmod.parse(base(stages=[{"name": "metadata_filter", "min_side": 512, "rules": [
        {"column": "AESTHETIC_SCORE", "op": ">=", "value": 5}, {"column": "pwatermark", "op": "<", "value": 0.5}]},
        "decode"]))
    rules = spec.stages[0].config.rules
    assert [(r.column, r.op, r.value) for r in rules] == [("AESTHETIC_SCORE", ">=", 5), ("pwatermark", "<", 0.5)]


@pytest.mark.parametrize(
    "data, message",
    [
        (
            base(output={"path": "/o", "samples_per_shrad": 5}),
            "unknown key 'output.samples_per_shrad'. Did you mean 'samples_per_shard'?",
        ),
        (base(stages=[{"name": "decoder"}]), "unknown stage 'decoder'. Did you mean 'decode'?"),
        (
            base(stages=[{"name": "decode", "animated": "keep"}]),
            "'keep' is not allowed; allowed values: 'first_frame', 'reject'",
        ),
        (base(stages=[{"name": "decode", "max_side": 8}]), "stages[0](decode).max_side: 8 is below the minimum 16"),
        (
            base(output={"path": "/o", "samples_per_shard": "many"}),
            "output.samples_per_shard: expected an integer, got 'many'",
        ),
        (
            base(stages=[{"name": "metadata_filter", "rules": [{"column": "x", "op": "=>", "value": 1}]}, "decode"]),
            "'=>' is not allowed",
        ),
        (base(stages=["phash_dedup", "decode"]), "needs a 'decode' stage before it"),
        ({"input": {"path": "/d"}}, "missing 'output' section"),
        (base(extra=1), "unknown top-level key(s) ['extra']"),
    ],
)
def test_bad_specs_name_the_key(data, message):
    with pytest.raises(ConfigError) as err:
        specmod.parse(data)
    assert message in str(err.value)


def test_overrides_by_index_and_name():
    data = base(stages=[{"name": "decode"}, {"name": "phash_dedup"}])
    apply_overrides(data, ["stages.decode.max_side=512", "stages.1.max_distance=0", "output.samples_per_shard=7"])
    spec = specmod.parse(data)
    assert spec.stages[0].config.max_side == 512
    assert spec.stages[1].config.max_distance == 0
    assert spec.output.samples_per_shard == 7
    with pytest.raises(ConfigError, match="no item named 'ocr'"):
        apply_overrides(data, ["stages.ocr.x=1"])


def test_fingerprint_ignores_ray_settings():
    a = specmod.parse(base())
    b = specmod.parse(base(ray={"num_cpus": 7}))
    c = specmod.parse(base(output={"path": "/out", "samples_per_shard": 3}))
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_jobs_specs_parse():
    import glob

    import yaml

    files = sorted(f for f in glob.glob("jobs/*.yaml") if yaml.safe_load(open(f)).get("kind") == "curate")
    assert files
    for f in files:
        try:
            specmod.load(f)
        except ConfigError as exc:   # templates that name real weights say exactly what is missing
            name = os.path.basename(f)[:-5]
            if name == "recaption_images":
                assert "stages[1](caption).vlm_model: 'Qwen/Qwen2-VL-2B-Instruct' is not in the hub cache" in str(exc)
                spec = specmod.load(f, ["stages.caption.vlm_model=winnow-tiny-vlm",
                                        "stages.caption.summary_model=winnow-tiny-summary"])
                assert spec.output.caption == "caption_summary"
                continue
            index = {"curate_images_scored": 3, "lvd_video_curation": 3}[name]
            assert f"stages[{index}](clip).pretrained: tag 'laion2b_s32b_b82k'" in str(exc)
            tiny = ["stages.clip.model=winnow-tiny-clip", "stages.clip.pretrained=random",
                    "stages.aesthetic.weights=random"]
            if name == "lvd_video_curation":
                with pytest.raises(ConfigError, match=r"caption\).coca_pretrained: tag "
                                                      r"'mscoco_finetuned_laion2b_s13b_b90k' of coca_ViT-L-14"):
                    specmod.load(f, tiny)
                tiny += ["stages.caption.coca_model=winnow-tiny-coca", "stages.caption.coca_pretrained=random",
                         "stages.caption.vlm_model=winnow-tiny-vlm", "stages.caption.summary_model=winnow-tiny-summary"]
            spec = specmod.load(f, tiny)
            assert {"clip", "aesthetic", "ocr", "semantic_dedup"} <= {s.name for s in spec.stages}


def test_jobs_run_dispatches_each_spec_to_its_command():
    import glob

    import yaml

    from jobs.run import command

    got = {os.path.basename(f): command([f]) for f in glob.glob("jobs/*.yaml")}
    for name, cmd in got.items():
        assert cmd == yaml.safe_load(open(f"jobs/{name}"))["kind"], name
    assert got["svd_curriculum.yaml"] == "curriculum" and got["train_sd15.yaml"] == "train"
    assert {"train", "sweep", "select", "curate", "curriculum", "study", "camera-loras"} == set(got.values())


def test_runtime_keys_stay_out_of_the_fingerprint():
    stages = ["decode", {"name": "clip"}]
    a = specmod.parse(base(stages=stages))
    b = specmod.parse(base(stages=["decode", {"name": "clip", "batch_size": 7, "device": "cpu", "workers": 3}]))
    c = specmod.parse(base(stages=["decode", {"name": "clip", "min_similarity": 0.2}]))
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_float_keys_accept_yaml_exponents_without_a_dot():
    from training import train_spec as trainspec

    data = {"data": {"shards": ["x"]}, "output": {"path": "o"}, "optim": {"lr": "1e-4"}}
    assert trainspec.parse(data, check_paths=False).optim.lr == 1e-4
    with pytest.raises(ConfigError, match="optim.lr: expected a number, got 'fast'"):
        trainspec.parse({**data, "optim": {"lr": "fast"}}, check_paths=False)


def test_every_job_spec_names_its_command_and_a_wrong_kind_says_which_to_run(tmp_path):
    import glob

    import yaml

    from jobs.run import command

    for f in glob.glob("jobs/*.yaml"):
        assert yaml.safe_load(open(f))["kind"] in ("curate", "train", "sweep", "select", "curriculum", "study",
                                                   "camera-loras"), f
    # kind wins over the keys: a spec with a curate-looking `stages:` section is still a train job
    spec = tmp_path / "curriculum.yaml"
    spec.write_text("kind: train\nstages: [{resolution: 256}]\n")
    assert command([str(spec)]) == "train"
    spec.write_text("data: {shards: [x]}\n")                 # no kind: routed by its keys, as before
    assert command([str(spec)]) == "train"
    with pytest.raises(ConfigError, match=r"this is a sweep spec, not a curate spec; run it with `winnow sweep`"):
        specmod.parse({**base(), "kind": "sweep"})
    with pytest.raises(ConfigError, match=r"'curation' is not a winnow command"):
        specmod.parse({**base(), "kind": "curation"})
