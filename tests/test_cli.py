"""The command line: help on every subcommand, bad specs fail before Ray starts with exit code 2."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def winnow(*args, **kw):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, **kw)


def test_help():
    top = winnow("--help")
    assert top.returncode == 0 and "curate" in top.stdout
    sub = winnow("curate", "--help")
    assert sub.returncode == 0 and "--samples-per-shard" in sub.stdout and "--set" in sub.stdout


def test_the_cli_is_a_table_of_command_modules_imported_only_when_run():
    from pipeline import commands

    code = ("import sys; from pipeline.cli import parser_for; parser_for(None).format_help(); "
            "print(sorted(m for m in sys.modules if m.startswith(('pipeline.commands.', 'torch', 'ray'))))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                         capture_output=True, text=True, timeout=120)
    assert res.stdout.strip() == "[]"                       # `winnow --help` imports no command, no torch, no Ray
    for name in commands.COMMANDS:
        mod = commands.get(name)
        assert mod.NAME == name and mod.DESCRIPTION
        assert all(callable(getattr(mod, f)) for f in ("arguments", "from_args", "plan", "run", "format_summary")), name
    res = winnow("sweep", "--help")
    assert res.returncode == 0 and "Sweep filter thresholds" in res.stdout and "--set" in res.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["curate"], "give a SPEC.yaml, or both --input PATH and --output DIR"),
        (
            ["curate", "jobs/curate_images.yaml", "--set", "stages.decode.max_sid=5"],
            "unknown key 'stages[0](decode).max_sid'. Did you mean 'max_side'?",
        ),
        (
            ["curate", "--input", "/nonexistent/photos", "--output", "/tmp/x"],
            "input.path '/nonexistent/photos' does not exist",
        ),
        (["curate", "missing.yaml"], "spec file 'missing.yaml' does not exist"),
        (
            ["curate", "jobs/curate_images.yaml", "--set", "output.samples_per_shard=[1,"],
            "the value '[1,' is not valid YAML",
        ),
        (["train", "jobs/train_sd15.yaml", "--set", "train.max_steps={"], "the value '{' is not valid YAML"),
        (["sweep", "jobs/sweep_svd_filters.yaml", "--set", "a..b=1"], "'a..b' is not a dotted key"),
        (["curate", "jobs/curate_images.yaml", "--set", "stages.nope.x=1"], "no item named 'nope'"),
    ],
)
def test_bad_spec_fails_before_ray(args, message, tmp_path):
    res = winnow(*args)
    assert res.returncode == 2
    assert message in res.stderr
    assert "Started a local Ray" not in res.stderr and "Traceback" not in res.stderr


def test_jobs_run_is_the_same_entry_point(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT}
    res = subprocess.run([sys.executable, "-m", "jobs.run", "jobs/demo.yaml", "--set", "output.samples_per_shard=0"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "output.samples_per_shard: 0 is below the minimum 1" in res.stderr


def test_short_form_sets_options_of_the_default_stages(tmp_path):
    """``--set stages.NAME.KEY=VALUE`` without a spec edits the default stage list (the --help example)."""
    from PIL import Image

    from pipeline.commands import curate_spec as specmod

    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    base = {"input": {"path": str(tmp_path)}, "output": {"path": str(tmp_path / "out")}}
    spec = specmod.load(None, ["stages.decode.max_side=512", "stages.phash_dedup.max_distance=2"], base=base)
    assert [(s.name, s.config.max_side if s.name == "decode" else s.config.max_distance) for s in spec.stages] == \
        [("decode", 512), ("phash_dedup", 2)]
    assert specmod.DEFAULT_IMAGE_STAGES == [{"name": "decode"}, {"name": "phash_dedup"}]   # defaults untouched


def test_version_and_stage_listing():
    res = winnow("--version")
    assert res.returncode == 0 and res.stdout.strip() == "winnow 0.1.0"
    names = [
        "aesthetic",
        "caption",
        "clip",
        "clips",
        "decode",
        "metadata_filter",
        "motion",
        "ocr",
        "phash_dedup",
        "semantic_dedup",
    ]
    res = winnow("stages")                 # the short list: one line a stage, and how to see more
    assert res.returncode == 0 and [line.split()[0] for line in res.stdout.splitlines()[:10]] == names
    assert len(res.stdout.splitlines()) == 12 and "winnow stages --all" in res.stdout and "``" not in res.stdout
    res = winnow("stages", "--all")
    assert res.returncode == 0 and "``" not in res.stdout
    heads = [line.split(":")[0] for line in res.stdout.splitlines() if line and not line.startswith(" ")]
    assert heads == names
    assert "    max_side: int = 1024\n        longest side of the stored image; never upscaled" in res.stdout
    assert "    cuts.detector: 'cascade' | 'transnetv2' = 'cascade'" in res.stdout      # nested configs, dotted
    assert "policy" not in res.stdout and "storage_options" not in res.stdout         # filled in by winnow
    res = winnow("stages", "deocde")
    assert res.returncode == 2 and "unknown stage 'deocde'. Did you mean 'decode'?" in res.stderr


def test_a_run_is_quiet_by_default_and_a_rerun_says_it_is_complete(tmp_path):
    """Ray's token-auth notice, its "Started a local Ray" and Ray Data's executor and progress-bar
    lines are not about the user's run: hidden unless -v. A finished run re-run says so first."""
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.new("RGB", (40 + i, 30), (10 * i, 0, 0)).save(photos / f"{i}.jpg")
    args = ("curate", "--input", str(photos), "--output", str(tmp_path / "out"), "--set", "ray.num_cpus=1")
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("RAY_ADDRESS", None)
    first = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    for noise in ("Token authentication", "Started a local Ray", "streaming_executor", "Progress bars disabled",
                  " INFO ", " WARNING "):
        assert noise not in first.stderr, noise
    assert first.stdout.splitlines()[0].startswith("winnow curate:") and "already complete" not in first.stdout
    again = winnow(*args)
    assert again.returncode == 0 and again.stdout.splitlines()[1] == (
        "  already complete: every shard was written by an earlier run; nothing was redone")


def test_a_mistyped_option_gets_a_suggestion_and_errors_without_a_spec_are_not_spec_errors(tmp_path):
    res = winnow("curate", "--inptu", "x", "--output", "y")
    assert res.returncode == 2 and "unrecognized arguments: --inptu; --inptu: did you mean --input?" in res.stderr
    res = winnow("report", str(tmp_path))
    assert res.returncode == 2 and res.stderr.startswith(f"winnow: {str(tmp_path)!r} has no annotation table")
    res = winnow(
        "curate", "--input", str(tmp_path), "--output", str(tmp_path / "o"), "--set", "stages.ocr.backend=rapidocr"
    )
    assert res.returncode == 2 and "--set 'stages=[decode, phash_dedup, {name: ocr}]'" in res.stderr


def test_counts_are_said_in_the_right_number():
    from pipeline.contract.config import plural

    assert (plural(1, "step"), plural(2, "step"), plural(1, "bucket"), plural(0, "worker"), plural(1200, "sample")) == \
        ("1 step", "2 steps", "1 bucket", "0 workers", "1,200 samples")
