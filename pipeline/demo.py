"""``make demo``: build a bundled corpus, curate it on a local Ray (with HTML reports), sweep thresholds,
materialise a selection, train tiny SD and SDXL on the selected samples, run a study (a tiny LoRA
per sweep cell, each evaluated: CLIP score, FID, validation loss) and a tiny SVD curriculum.

    python -m pipeline.demo [--output demo_out] [--images 240]
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import time

from pipeline.commands import curate
from pipeline.commands import curate_spec as specmod
from pipeline.commands.curate import format_summary
from pipeline.contract import layout
from pipeline.corpus import make_corpus
from pipeline.synth import make_video_corpus

DEMO_ENTRIES = ["demo.yaml", "corpus", "run", "videos", "video_run", "sweep_laion", "sweep_svd", "select_aesthetic",
                "train_sd", "train_sdxl", "svd", "study", "camera_loras"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="demo_out", help="where the corpus and the run go (default demo_out/)")
    parser.add_argument(
        "--images", type=int, default=240, help="good images in the corpus (plus duplicates and bad files)"
    )
    parser.add_argument("--samples-per-shard", type=int, default=64)
    parser.add_argument("--train-steps", type=int, default=8, help="tiny SD and SDXL training steps at the end")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show Ray's and the model libraries' own notices and progress bars")
    args = parser.parse_args(argv)
    if not args.verbose:
        from pipeline.cli import quiet

        quiet()

    corpus_dir = os.path.join(args.output, "corpus")
    run_dir = os.path.join(args.output, "run")
    # the demo starts afresh, deleting only what an earlier demo wrote there (its ownership record)
    from pipeline.contract.config import ConfigError
    from pipeline.contract.layout import claim_output
    try:
        claim_output(args.output, os.path.join(args.output, "demo.yaml"), "demo", {"args": vars(args)}, True, "demo",
                     "arguments", DEMO_ENTRIES, "demo", fresh=True)
    except ConfigError as exc:
        print(f"demo: {exc} (or pass --output NEW_FOLDER)", file=sys.stderr)
        return 2
    t = time.time()
    expected = make_corpus(corpus_dir, n_images=args.images, seed=0, duplicates=8, text_images=6)
    bad = sum(1 for v in expected.values() if v and v != "duplicate")
    print(f"demo corpus: {len(expected)} files in {corpus_dir} ({args.images} images of varied aspect ratio and size, "
          f"8 resized duplicates, 6 text-heavy posters, {bad} broken files, 6 odd ones: CMYK, 16-bit, alpha, palette, "
          f"EXIF-rotated, animated) made in {time.time() - t:.1f} s")
    print("note: the demo's CLIP model and aesthetic head are tiny with RANDOM weights, so clip_similarity and "
          "aesthetic_score mean nothing here; its OCR (RapidOCR's bundled weights) is real")
    spec = specmod.load("jobs/demo.yaml" if os.path.exists("jobs/demo.yaml") else None, [
        f"input.path={corpus_dir}", f"output.path={run_dir}", f"output.samples_per_shard={args.samples_per_shard}"])
    result = curate.run(spec)
    print(format_summary(result))
    tars = sorted(glob.glob(os.path.join(run_dir, layout.SHARDS_DIR, "*.tar")))
    print(
        f"\noutputs:\n  {run_dir}/shards/00000.tar .. {os.path.basename(tars[-1])}   WebDataset shards "
        "(KEY.jpg, KEY.txt, KEY.json)"
        f"\n  {run_dir}/shards/NNNNN.parquet  the annotation table: one row per input, kept and rejected, with "
        f"reject_reason and every score (each row once: DuckDB '{run_dir}/shards/*.parquet')"
        f"\n  {run_dir}/embeddings/         CLIP image/caption embeddings per shard, keyed"
        f"\n  {run_dir}/summary.json          counts per reason and per-stage time"
        f"\n  {run_dir}/spec.yaml             the resolved spec (re-run the same command to resume)"
    )

    video_dir = os.path.join(args.output, "videos")
    video_run = os.path.join(args.output, "video_run")
    t = time.time()
    make_video_corpus(video_dir)
    print(f"\ndemo videos: 10 files in {video_dir} (hard cuts, a fade through black, static and panning shots, a "
          f"rotated phone clip, a text poster, variable frame rate; a truncated, an empty and an audio-only file) "
          f"made in {time.time() - t:.1f} s")
    spec = specmod.load("jobs/demo_video.yaml" if os.path.exists("jobs/demo_video.yaml") else None, [
        f"input.path={video_dir}", f"output.path={video_run}"])
    result = curate.run(spec)
    print(format_summary(result))
    print(f"\noutputs:\n  {video_run}/shards/*.tar          clips (KEY.mp4 H.264, KEY.txt, KEY.json)"
          f"\n  {video_run}/videos/*.parquet    one row per video: probe fields, cut_times_s, num_clips, reason"
          f"\n  {video_run}/shards/*.parquet    one row per clip: start_s, end_s, motion_score, ocr, clip scores")

    from pipeline.commands import select as selection
    from pipeline.commands import sweep

    sweeps = {}
    for job, src, name in (("jobs/sweep_laion_aesthetic.yaml", run_dir, "sweep_laion"),
                           ("jobs/sweep_svd_filters.yaml", video_run, "sweep_svd")):
        sweeps[name] = os.path.join(args.output, name)
        print(f"\nsweeping the annotations of {src} ({job})")
        print(sweep.format_summary(sweep.run(sweep.load(job, [f"annotations=[{src}]", f"output={sweeps[name]}"]))))
    select_dir = os.path.join(args.output, "select_aesthetic")
    print("\nmaterialising 'drop the bottom 25 % by aesthetic score' as its own shard set "
          "(jobs/select_laion_aesthetic.yaml)")
    sel = selection.load("jobs/select_laion_aesthetic.yaml", [f"runs=[{run_dir}]", f"output.path={select_dir}"])
    print(selection.format_summary(selection.run(sel)))
    manifest = os.path.join(sweeps["sweep_laion"], "selections", "cell_002.parquet")
    print(f"\nreports (open in a browser; self-contained):\n  {run_dir}/report.html\n  {video_run}/report.html"
          f"\n  {select_dir}/report.html\nsweeps: {sweeps['sweep_laion']}/cells.md, plots/, sheets/ and "
          f"{sweeps['sweep_svd']}/cells.md, plots/, sheets/")

    from pipeline.commands import train as trainer
    from training import train_spec as trainspec

    # SD trains on the materialised selection; SDXL on the full run restricted by a sweep cell's manifest
    for job, kind, data in (
        ("jobs/train_sd15.yaml", "SD", [f"data.shards=[{select_dir}]"]),
        ("jobs/train_sdxl.yaml", "SDXL", [f"data.shards=[{run_dir}]", f"data.selection={manifest}"]),
    ):
        out = os.path.join(args.output, f"train_{kind.lower()}")
        source = f"{select_dir}/shards" if kind == "SD" else f"{run_dir}/shards, selection {manifest}"
        print(f"\ntraining tiny {kind} (random weights) for {args.train_steps} steps on {source} with "
              f"2 Ray Train workers ({job}, at bucket base 128)")
        tspec = trainspec.load(job if os.path.exists(job) else None, [
            *data, f"output.path={out}", "data.resolution=128", "data.bucket_step=32",
            f"train.max_steps={args.train_steps}", f"train.checkpoint_every={max(1, args.train_steps // 2)}",
            "train.log_every=2", "train.sample_steps=10", "ema.start_step=0", "optim.lr=1e-4"])
        print(trainer.format_summary(trainer.run(tspec)))
    from pipeline.commands import study

    study_dir = os.path.join(args.output, "study")
    print(f"\nstudy: a tiny LoRA run (rank 8, {args.train_steps} steps) on each of three cells of the aesthetic sweep "
          f"(all, drop 25 %, drop 50 %), each sampled on 8 of the run's captions and scored "
          f"(jobs/sweep_train_eval.yaml; random CLIP and Inception, so the numbers mean nothing here)")
    sspec = study.load("jobs/sweep_train_eval.yaml", [
        f"sweep={sweeps['sweep_laion']}", f"output={study_dir}", f"eval.prompts={run_dir}", f"eval.reference={run_dir}",
        f"train_set=[lora.enabled=true,lora.rank=8,optim.lr=1e-4,optim.warmup_steps=0,ema.start_step=0,"
        f"data.resolution=128,data.bucket_step=32,train.max_steps={args.train_steps},"
        f"train.checkpoint_every={args.train_steps},train.log_every=2,train.sample_steps=4,"
        f"train.eval_every={args.train_steps},train.eval_fraction=0.1]"])
    print(study.format_summary(study.run(sspec)))
    from pipeline.commands import prefer

    print("\npreference: the study's cells ranked by a judge, the tiny random CLIP, in 60 votes on the pairs the page "
          "would show people (the votes mean nothing here; people vote in the page)")
    pspec = prefer.from_args(prefer_args([study_dir, "--judge", "clip", "--votes", "60", "--replicates", "200"]))
    print(prefer.format_summary(prefer.run(pspec)))
    svd, interp = tiny_curriculum(select_dir, video_run, os.path.join(args.output, "svd"), args.train_steps // 2)
    interp_scores(interp, video_dir)
    loras = camera_loras(video_run, svd, os.path.join(args.output, "camera_loras"), corpus_dir,
                         args.train_steps // 2)
    print(f"\n  {args.output}/train_sd/final   a StableDiffusionPipeline folder (from_pretrained loads it)"
          f"\n  {args.output}/train_sdxl/final a StableDiffusionXLPipeline folder"
          f"\n  {svd}  a StableVideoDiffusionPipeline folder (image -> text-to-video -> image-to-video)"
          f"\n  {interp}/final  the interpolation model (svd_interp): winnow interpolate --run {interp} "
          f"{video_dir}/pan.mp4 --out pan_4x.mp4"
          f"\n  {loras}/moves/*/lora  one temporal LoRA per camera move (training.lora.load_into + use_adapter)"
          f"\n  {study_dir}/cells/cell_000/lora  a LoRA (pipe.load_lora_weights) on {study_dir}/cells/cell_000/base"
          f"\n  {study_dir}/study.md, plots/scores_vs_kept.png  the eval table and plot"
          f"\n  {study_dir}/plots/preference_vs_kept.png  the judge's preference against the data kept"
          f"\n  vote yourself (a page on 127.0.0.1:8765): winnow prefer {study_dir}"
          f"\n  continue a run: winnow train {args.output}/train_sd/train_spec.yaml --set train.max_steps=16"
          "\n\nto run winnow yourself: source .venv/bin/activate   (then: winnow --help)")
    return 0


def prefer_args(argv: list[str]):
    """``winnow prefer``'s arguments parsed as the command line parses them."""
    import argparse

    from pipeline.commands import prefer

    parser = argparse.ArgumentParser(prog="winnow prefer")
    prefer.arguments(parser)
    return parser.parse_args(argv)


def tiny_curriculum(images: str, clips: str, out: str, steps: int) -> tuple[str, str]:
    """jobs/svd_curriculum.yaml in miniature: tiny SD on the selected images, inflated into a tiny
    text-to-video model on the demo's clips (trained on their caption_summary, the videos having no text),
    widened into image-to-video, widened again into frame interpolation (3 frames between two, at the
    clips' 10 fps); returns (the image-to-video pipeline folder, the interpolation stage's run)."""
    from pipeline.commands import curriculum

    train = {"max_steps": steps, "checkpoint_every": steps, "log_every": 1, "batch_size": 1, "sample_prompts": []}
    video = {"buckets": {"48x80": {4: 1}}, "fps": 5.0}
    spec = curriculum.parse({"kind": "curriculum", "output": {"path": out}, "ray": {"num_workers": 2}, "stages": [
        {"name": "image", "data": {"shards": [images], "resolution": 64}, "model": {"kind": "sd"}, "train": train},
        {"name": "video_lowres", "init": "previous", "data": {"shards": [clips], "captions": {"caption_summary": 1}},
         "model": {"kind": "svd_t2v"},
         "video": {**video, "p_mean": -1.2, "p_std": 1.2}, "train": train},
        {"name": "image_to_video", "init": "previous", "data": {"shards": [clips]}, "model": {"kind": "svd"},
         "video": {**video, "p_mean": 0.7}, "train": train},
        {"name": "interpolation", "init": "previous", "data": {"shards": [clips]}, "model": {"kind": "svd_interp"},
         "video": {"buckets": {"48x80": {5: 1}}, "fps": 10.0}, "train": train}]})
    print(f"\nthe SVD curriculum in miniature (jobs/svd_curriculum.yaml's stages, tiny random models, {steps} steps "
          f"each): image -> inflated text-to-video -> image-to-video -> frame interpolation")
    result = curriculum.run(spec)
    print(curriculum.format_summary(result))
    return os.path.join(result.stages[2]["dir"], "final"), result.stages[3]["dir"]


def interp_scores(run: str, videos: str) -> None:
    """`winnow eval --run INTERP --clips VIDEOS`: the interpolation model's in-between frames against the
    true ones and against the linear blend (random tiny model: the blend wins here)."""
    from pipeline.commands import eval as ev

    print(f"\ninterpolation scored on the demo's videos (winnow eval --run {run} --clips {videos}):")
    print(ev.format_summary(ev.run(ev.EvalSpec(run=run, held_out=videos, num=6, steps=4), log=None)))


def camera_loras(clips: str, base: str, out: str, images: str, steps: int) -> str:
    """jobs/svd_camera_loras.yaml in miniature: a temporal LoRA per camera move the demo's clips have (at
    least 2 clips), on the image-to-video model, then one scored for how often its samples move its way."""
    from pipeline.commands import camera_loras as cl
    from pipeline.commands import eval as ev
    from pipeline.contract.media import MediaError, open_image

    train = {"max_steps": steps, "checkpoint_every": steps, "log_every": 1, "batch_size": 1, "sample_prompts": []}
    spec = cl.parse({"kind": "camera-loras", "clips": clips, "output": {"path": out}, "min_clips": 2,
                     "ray": {"num_workers": 2},
                     "train": {"model": {"kind": "svd", "pretrained": base}, "lora": {"rank": 4},
                               "video": {"buckets": {"48x80": {4: 1}}, "fps": 5.0}, "train": train}})
    print(f"\ncamera LoRAs (jobs/svd_camera_loras.yaml in miniature): one per camera_move of the demo's clips with "
          f"at least 2 clips, {steps} steps each on the image-to-video model")
    result = cl.run(spec)
    print(cl.format_summary(result))
    trained = [m for m in result.moves if m["adapter"]]
    if trained:
        frames = os.path.join(out, "eval_frames")
        os.makedirs(frames, exist_ok=True)
        picked = 0
        for path in sorted(glob.glob(os.path.join(images, "**", "*.jpg"), recursive=True)):
            try:                          # the corpus holds broken files on purpose
                with open_image(path) as im:
                    im.convert("RGB").resize((80, 48)).save(os.path.join(frames, f"{picked}.png"))
            except (OSError, ValueError, MediaError):
                continue
            picked += 1
            if picked == 4:
                break
        with open(os.path.join(out, "eval_prompts.txt"), "w", encoding="utf-8") as fh:
            fh.write("\n".join(["a clip"] * max(1, picked)) + "\n")
        print(f"\ncontrollability of the {trained[0]['move']} LoRA (random tiny models: the share means nothing "
              f"here; `winnow eval` on a real camera LoRA measures it):")
        print(ev.format_summary(ev.run(ev.EvalSpec(run=trained[0]["run"], prompts=os.path.join(out, "eval_prompts.txt"),
                                                   frames=frames, steps=4), log=None)))
    return out


if __name__ == "__main__":
    sys.exit(main())
