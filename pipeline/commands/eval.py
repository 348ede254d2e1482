"""``winnow eval``: score a trained run, or images that exist, with CLIP score and FID.

* ``--run OUTPUT [--checkpoint DIR]`` samples the run's model (``training/generate.py``: its
  ``final/``, its LoRA on the base, or a checkpoint) once per prompt into ``OUTPUT/eval/<weights>/``
  (PNGs, or GIFs for video models, and ``prompts.jsonl``), then scores what it made.
* ``--images DIR`` scores a folder as it is (``--prompts`` pairs its files, in sorted order, with
  the prompt file's lines).

Prompts (``--prompts``) are a text file (one per line; blank lines and ``#`` comments skipped) or
a curated shard set (a `winnow curate` output folder: the captions of its kept samples, by key),
so a held-out shard set's captions serve as the prompt set, as SD 2's report used COCO's.

Metrics (``training/evaluate.py``):

* CLIP score (Hessel et al., 2021): ``100 * max(cos, 0)`` between each image and its prompt, with
  the open_clip model given (``--clip-model``/``--clip-pretrained``, resolved as curation resolves
  them: local files only). For videos: the mean over frames, and frame consistency, the mean cosine
  of consecutive frames' CLIP image embeddings.
* FID (Heusel et al., 2017) against ``--reference`` (a folder of images or a shard set), with
  Inception-v3 weights from ``--fid-weights`` (torchvision's or pytorch-fid's file, or ``random``).

Every file is read under curate's input rules (regular files only, bounded reads, the decoder's
pixel and memory caps); one that is not a readable image is counted under its reason and left out.
"""
from __future__ import annotations

import itertools
import json
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from pipeline.contract.config import ConfigError
from pipeline.contract.layout import SHARDS_DIR, TrainRun, atomic_write
from pipeline.contract.media import gif_frames, write_gif

NAME = "eval"
DESCRIPTION = """\
Score a trained run (sampled once per prompt) or a folder of images: CLIP score and FID.

  winnow eval --run OUTPUT [--checkpoint DIR] --prompts FILE|SHARDS [--reference DIR|SHARDS --fid-weights PATH|random]
  winnow eval --images DIR [--prompts FILE] [--reference DIR|SHARDS --fid-weights PATH|random]

--prompts is a text file (one prompt per line) or a `winnow curate` output (its kept captions).
--fid-weights is torchvision's or pytorch-fid's Inception-v3 weights file; `random` is a seeded random
network for tests and demos. --clip-model/--clip-pretrained name the CLIP model as curation does
(default: the tiny random CLIP, whose scores mean nothing).
"""
TEXT_SUFFIXES = (".txt", ".json", ".jsonl", ".parquet")


@dataclass
class EvalSpec:
    images: str | None = None
    reference: str | None = None
    fid_weights: str | None = None
    run: str | None = None
    checkpoint: str | None = None
    prompts: str | None = None
    frames: str | None = None            # image-to-video runs: the conditioning images
    num: int = 64
    steps: int = 20
    guidance: float = 7.5
    size: int | None = None
    num_frames: int | None = None
    clip_model: str | None = None
    clip_pretrained: str | None = None
    out: str | None = None
    seed: int = 0
    max_images: int = 50_000
    batch: int = 32
    json: bool = False
    held_out: str | None = None          # interpolation runs: held-out videos whose in-between frames are scored
    lpips_alexnet: str | None = None     # with held_out: torchvision's AlexNet weights, for LPIPS
    lpips_linear: str | None = None      # and LPIPS's linear layers (the lpips package's alex.pth)


@dataclass
class EvalResult:
    images: str
    reference: str | None
    counts: dict               # per set: scored, skipped (by reason)
    fid: float | None
    fid_weights: str | None
    seed: int
    wall_s: float
    clip_score: float | None = None
    clip_model: str | None = None
    frame_consistency: float | None = None
    weights: str | None = None          # what --run loaded
    generated: int = 0
    clip_cosine: float | None = None    # the mean raw cosine behind the CLIP score (which clips below 0)
    camera: dict | None = None          # a camera-move LoRA's run: its samples' camera_move against the base's
    interpolation: dict | None = None   # an svd_interp run: PSNR / SSIM of its frames and of the linear blend
    warnings: list = field(default_factory=list)
    print_json: bool = False

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "print_json"}


# ---- reading images ----

def _walk_order(rel: str) -> tuple:
    """A sort key that lists a folder's own files before its sub-folders, each by name (``os.walk``'s
    top-down order), for a local folder and a store's flat key list alike."""
    *dirs, leaf = rel.split("/")
    return (*((1, d) for d in dirs), (0, leaf))


def _files(root: str, limit: int) -> list[str]:
    from pipeline.contract import storage

    found = [f for f in storage.find(root) if not f.lower().endswith(TEXT_SUFFIXES)]
    return sorted(found, key=lambda f: _walk_order(_rel(f, root)))[:limit]


def _rel(path: str, root: str) -> str:
    """``path`` relative to ``root``, with ``/`` separators (local folder or store)."""
    from pipeline.contract import storage

    if storage.is_url(root):
        return path[len(root.rstrip("/")) + 1:]
    return os.path.relpath(path, root).replace(os.sep, "/")


def is_shard_set(path: str) -> bool:
    from pipeline.contract import storage

    return storage.isdir(storage.join(path, SHARDS_DIR)) and not storage.isfile(TrainRun(path).spec)


def _shard_members(root: str, limit: int, skipped: dict):
    """(name, bytes) of the image members of a shard set's tars, read without extracting anything."""
    import tarfile

    from pipeline.contract import storage
    from pipeline.contract import tar as tars
    from pipeline.contract.inputs import InputPolicy
    from pipeline.contract.schema import IMAGE_EXTENSIONS

    cap, n = InputPolicy().max_file_bytes, 0
    for path in storage.files_in(storage.join(root, SHARDS_DIR), ".tar"):
        try:                                # read as a stream: one pass, nothing extracted
            with storage.open_read(path) as fh:
                for name, data, refused in tars.stream(fh, lambda m: m.lower().endswith(IMAGE_EXTENSIONS), cap):
                    if refused:
                        skipped[refused] = skipped.get(refused, 0) + 1
                        continue
                    yield f"{storage.name(path)}/{name}", data
                    n += 1
                    if n >= limit:
                        return
        except (tarfile.TarError, OSError) as exc:
            skipped["bad_tar"] = skipped.get("bad_tar", 0) + 1
            print(f"winnow eval: {path}: {exc}", file=sys.stderr)


def _sources(root: str, limit: int, skipped: dict):
    """(name, bytes or the exception that refused it) of a folder's files or a shard set's images."""
    if is_shard_set(root):
        yield from _shard_members(root, limit, skipped)
        return
    from pipeline.contract import storage
    from pipeline.contract.inputs import InputPolicy, InputRejected, read_file

    policy = InputPolicy(root=None if storage.is_url(root) else os.path.realpath(root))
    for path in _files(root, limit):
        try:
            yield _rel(path, root), read_file(path, policy)
        except (InputRejected, OSError) as exc:
            if storage.transient(exc):      # the store is away past the retries: stop, do not miscount
                raise
            yield _rel(path, root), exc


COND_SIDE = 512      # the conditioning frame kept beside a video, for the preference page


def write_cond(image, folder: str, name: str) -> tuple[str, str]:
    """Save an image-to-video conditioning frame beside its sample (at most COND_SIDE px a side) and
    return its name and the SHA-256 of its RGB pixels as given, so that runs sampled from the same
    frames pair up in `winnow prefer`."""
    import hashlib

    rgb = image.convert("RGB")
    digest = hashlib.sha256(b"%dx%d:" % rgb.size + rgb.tobytes()).hexdigest()
    small = rgb.copy()
    small.thumbnail((COND_SIDE, COND_SIDE))
    small.save(os.path.join(folder, name))
    return name, digest


def read_images(root: str, limit: int, skipped: dict):
    """(name, RGB PIL image) of every readable image; the rest counted in ``skipped`` by reason."""
    from curation.decode import DecodeConfig, DecodeError, decode_image
    from pipeline.contract.inputs import InputRejected

    cfg = DecodeConfig(max_side=1024)
    for name, data in _sources(root, limit, skipped):
        try:
            if isinstance(data, Exception):
                raise data
            img, _, _ = decode_image(data, cfg)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is a counted skip
            reason = str(exc).split(":", 1)[0] if isinstance(exc, (DecodeError, InputRejected)) \
                else type(exc).__name__
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        yield name, img.convert("RGB")


def _batches(items, n: int):
    """Lists of up to ``n`` consecutive items of an iterable (the last may be shorter)."""
    it = iter(items)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


def inception_batches(images, batch: int):
    """Uint8 (n, 3, 299, 299) batches of PIL images, ``batch`` at a time (memory stays one batch)."""
    from PIL import Image

    from pipeline.models.inception import INCEPTION_SIZE

    arrays = (np.asarray(img.resize((INCEPTION_SIZE, INCEPTION_SIZE), Image.BICUBIC)).transpose(2, 0, 1)
              for img in images)
    return (np.stack(chunk) for chunk in _batches(arrays, batch))


def image_batches(root: str, limit: int, batch: int, skipped: dict):
    """Inception batches of a folder's (or shard set's) readable images."""
    return inception_batches((img for _, img in read_images(root, limit, skipped)), batch)


# ---- prompts ----

def read_prompts(source: str, limit: int) -> list[str]:
    """A text file's prompts, or a shard set's kept captions (sorted by key)."""
    from pipeline.contract import layout, storage

    if storage.isdir(source):
        rows = []
        for path in storage.files_in(storage.join(source, "shards"), ".parquet"):
            t = layout.read_table(path, columns=["key", "caption", "status"]).to_pylist()
            rows += [
                (r["key"], r["caption"].strip()) for r in t if r["status"] == "kept" and (r["caption"] or "").strip()
            ]
        return [c for _, c in sorted(rows)][:limit]
    lines = [line.strip() for line in storage.read_bytes(source).decode("utf-8", errors="replace").splitlines()]
    return [line for line in lines if line and not line.startswith("#")][:limit]


# ---- the command ----

def plan(spec: EvalSpec) -> dict:
    """Check the arguments before any model loads; a ConfigError says what to change."""
    if bool(spec.images) == bool(spec.run):
        raise ConfigError("give either --run OUTPUT (sample a trained run) or --images DIR (score a folder)")
    from pipeline.contract import storage

    for key, path in (("--images", spec.images), ("--reference", spec.reference), ("--run", spec.run),
                      ("--checkpoint", spec.checkpoint), ("--prompts", spec.prompts), ("--frames", spec.frames),
                      ("--fid-weights", spec.fid_weights)):
        if path and storage.is_url(path):
            try:
                storage.exists(path)
            except Exception as exc:  # noqa: BLE001 - a store that cannot be reached, in one line
                raise ConfigError(f"{key} {path!r}: {storage.redact(str(exc)).splitlines()[0]}") from None
    if spec.out:
        storage.check_writable(spec.out, "--out")
    if spec.images and not storage.isdir(spec.images):
        raise ConfigError(f"--images: {spec.images!r} is not a folder of images")
    if spec.reference and not storage.isdir(spec.reference):
        raise ConfigError(f"--reference: {spec.reference!r} is not a folder of images or a shard set")
    if spec.reference and not spec.fid_weights:
        raise ConfigError("--fid-weights: required with --reference; give torchvision's Inception-v3 weights "
                          "(inception_v3_google-*.pth), pytorch-fid's file, or 'random' (tests and demos only)")
    if spec.fid_weights and spec.fid_weights != "random" and not storage.isfile(spec.fid_weights):
        raise ConfigError(f"--fid-weights: {spec.fid_weights!r} is not a file; give torchvision's Inception-v3 "
                          f"weights (inception_v3_google-*.pth) or 'random' (tests and demos only)")
    if spec.prompts and not (storage.isfile(spec.prompts) or is_shard_set(spec.prompts)):
        raise ConfigError(f"--prompts: {spec.prompts!r} is neither a text file nor a `winnow curate` output folder")
    if spec.run and not spec.images:
        from training import families
        from training.generate import run_spec

        if families.get(run_spec(spec.run).model.kind).interpolates():
            return _plan_interp(spec)
    if spec.held_out or spec.lpips_alexnet or spec.lpips_linear:
        raise ConfigError("--clips and --lpips-*: score an interpolation run (model.kind svd_interp); this is not one")
    if not spec.reference and not spec.prompts:
        raise ConfigError("nothing to score: give --prompts (CLIP score) and/or --reference with --fid-weights (FID)")
    if spec.frames and not storage.isdir(spec.frames):
        raise ConfigError(f"--frames: {spec.frames!r} is not a folder of conditioning images")
    out = {"images": spec.images}
    if spec.run:
        from training import families
        from training.generate import run_spec, weights_of

        if not spec.prompts:
            raise ConfigError("--prompts: required with --run (what to sample); a text file or a shard set")
        ts = run_spec(spec.run)
        out["weights"] = weights_of(spec.run, spec.checkpoint)
        out["kind"] = ts.model.kind
        families.get(ts.model.kind).check_generate(bool(spec.frames))
    if spec.clip_model or spec.clip_pretrained:
        from pipeline.models.clip import TINY_CLIP, resolve_weights

        resolve_weights(spec.clip_model or TINY_CLIP, spec.clip_pretrained, key="--clip")
    return out


def _plan_interp(spec: EvalSpec) -> dict:
    from pipeline.contract import storage
    from training.generate import run_spec, weights_of

    for key, given in (("--prompts", spec.prompts), ("--frames", spec.frames), ("--reference", spec.reference)):
        if given:
            raise ConfigError(f"{key}: an interpolation run is scored on held-out clips (--clips), not on {key[2:]}")
    if not spec.held_out or not storage.isdir(spec.held_out):
        raise ConfigError("--clips: give a folder of held-out videos (never trained on) shot at least at the run's "
                          "video.fps; their in-between frames are the truth")
    if bool(spec.lpips_alexnet) != bool(spec.lpips_linear):
        raise ConfigError("--lpips-alexnet and --lpips-linear go together: LPIPS needs AlexNet's weights and its own "
                          "linear layers")
    for key, path in (("--lpips-alexnet", spec.lpips_alexnet), ("--lpips-linear", spec.lpips_linear)):
        if path and not storage.isfile(path):
            raise ConfigError(f"{key}: {path!r} is not a file")
    ts = run_spec(spec.run)
    return {"images": None, "weights": weights_of(spec.run, spec.checkpoint), "kind": ts.model.kind,
            "clips": spec.held_out, "lpips": bool(spec.lpips_alexnet)}


MAX_CLIP_BYTES = 512 * 2 ** 20       # a held-out clip larger than this is skipped


def interp_scores(spec: EvalSpec, log) -> tuple[dict, str]:
    """PSNR and SSIM of the frames an interpolation run predicts between each window's first and
    last frame, against the true frames, and of the linear blend of those two: windows of F frames
    at the run's rate, back to back from each clip's start, ``spec.num`` windows in all. A clip
    slower than the run's rate (its in-between frames would be repeats) or shorter than a window is
    skipped with its reason. PSNR is capped at 100 dB (identical frames)."""
    from PIL import Image
    from tqdm.auto import tqdm

    from pipeline.contract import storage
    from pipeline.contract.schema import VIDEO_EXTENSIONS
    from training.evaluate import Lpips, linear_blend, psnr, ssim
    from training.generate import interp_frames, load_run
    from training.video_frames import decode_frames
    from video.probe import probe

    model = load_run(spec.run, spec.checkpoint)
    frames_n, height, width = interp_frames(model.spec)
    fps = float(model.spec.video.fps)
    span = (frames_n - 1) / fps
    files = sorted(f for f in storage.listdir(spec.held_out) if f.lower().endswith(VIDEO_EXTENSIONS))
    skipped: dict = {}
    lpips = None
    if spec.lpips_alexnet:
        with storage.local_copy(spec.lpips_alexnet) as alex, storage.local_copy(spec.lpips_linear) as lin:
            lpips = Lpips(alex, lin)
    names = ("psnr", "ssim", "lpips") if lpips else ("psnr", "ssim")
    scores = {who: {m: [] for m in names} for who in ("model", "blend")}
    windows = 0
    bar = tqdm(total=spec.num, desc="eval: interpolating", unit="window", file=log, disable=log is None)
    for name in files:
        if windows >= spec.num:
            break
        path = storage.join(spec.held_out, name)
        try:
            data = storage.read_bytes(path, limit=MAX_CLIP_BYTES)
            info = probe(data)
        except Exception as exc:  # noqa: BLE001 - an unreadable clip is skipped with its reason
            skipped[f"unreadable ({type(exc).__name__})"] = skipped.get(f"unreadable ({type(exc).__name__})", 0) + 1
            continue
        clip_fps, duration = float(info.fps or 0), float(info.duration_s or 0)
        if clip_fps < fps * 0.99:
            skipped["slower than the run's video.fps"] = skipped.get("slower than the run's video.fps", 0) + 1
            continue
        starts = np.arange(0.0, duration - span - 0.5 / clip_fps, span)
        if not len(starts):
            skipped["shorter than a window"] = skipped.get("shorter than a window", 0) + 1
            continue
        for t0 in starts[:spec.num - windows]:
            got = decode_frames(data, [t0 + k / fps for k in range(frames_n)])[0]
            truth = [np.asarray(Image.fromarray(f).resize((width, height), Image.BICUBIC)) for f in got]
            first, last = (Image.fromarray(truth[0]), Image.fromarray(truth[-1]))
            pred = model.family.interpolate(model.comps, None, first, last, frames_n, spec.steps, fps,
                                            spec.seed + windows)
            for k in range(1, frames_n - 1):
                blend = linear_blend(truth[0], truth[-1], k / (frames_n - 1))
                for who, img in (("model", np.asarray(pred[k - 1])), ("blend", blend)):
                    scores[who]["psnr"].append(min(100.0, psnr(img, truth[k])))
                    scores[who]["ssim"].append(ssim(img, truth[k]))
                    if lpips:
                        scores[who]["lpips"].append(lpips(img, truth[k]))
            windows += 1
            bar.update()
    bar.close()
    if not windows:
        raise ConfigError(f"--clips: no window of {frames_n} frames at {fps:g} fps in {spec.held_out!r} "
                          f"(skipped: {skipped or 'no video files'})")
    doc = {"windows": windows, "frames": windows * (frames_n - 2), "rate_fps": fps, "factor": frames_n - 1,
           "skipped": skipped, **{f"{who}_{m}": round(float(np.mean(v)), 4) for who in scores
                                  for m, v in scores[who].items()}}
    return doc, model.source


def _generate(spec: EvalSpec, log, stage: str) -> tuple[str, str, list[str], str, bool]:
    """Sample the run once per prompt into the output folder; returns (that folder, the local folder
    holding the samples, prompts, weights, video).

    An output on a store is written in ``stage`` (a local scratch folder, scored from there) and
    uploaded file by file, ``prompts.jsonl`` last: a folder with it is complete."""
    import torch
    from tqdm.auto import tqdm

    from pipeline.contract import storage
    from training.generate import generate, load_run

    model = load_run(spec.run, spec.checkpoint)
    prompts = read_prompts(spec.prompts, spec.num)
    if not prompts:
        raise ConfigError(f"--prompts: {spec.prompts!r} holds no prompts")
    name = storage.name(spec.checkpoint) if spec.checkpoint else \
        (TrainRun.FINAL if storage.isdir(TrainRun(spec.run).final) else TrainRun.LORA)
    target = spec.out or storage.join(TrainRun(spec.run).eval, name)
    folder = stage if storage.is_url(target) else target
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(spec.seed)
    bar = tqdm(total=len(prompts), desc="eval: sampling", unit="prompt", file=log, disable=log is None)
    cond = [img for _, img in read_images(spec.frames, len(prompts), {})] if spec.frames else None
    outs = generate(model, prompts, cond, spec.steps, spec.guidance, spec.size, spec.num_frames, spec.seed,
                    progress=bar.update)
    prompts = prompts[:len(outs)]                 # image-to-video: one video per conditioning frame
    camera = camera_control(spec, model, outs, prompts, cond, log)
    video = any(len(frames) > 1 for frames in outs)
    files = []
    for k, frames in enumerate(outs):             # a video as a GIF at the run's fps, an image as a PNG
        if video:
            files.append(f"{k:05d}.gif")
            write_gif(frames, os.path.join(folder, files[-1]), model.spec.video.fps)
        else:
            files.append(f"{k:05d}.png")
            frames[0].save(os.path.join(folder, files[-1]))
    bar.close()
    rows = [{"file": f, "prompt": p, "seed": spec.seed + k}
            for k, (f, p) in enumerate(zip(files, prompts, strict=True))]
    for k, row in enumerate(rows[:len(cond or ())]):     # image-to-video: the frame each video started from
        row["cond"], row["cond_sha256"] = write_cond(cond[k], folder, f"{k:05d}.cond.png")
    listing = "".join(json.dumps(row) + "\n" for row in rows)
    atomic_write(os.path.join(folder, "prompts.jsonl"), listing.encode())     # last: the folder is complete
    if folder != target:
        storage.copy_tree(folder, target, last=("prompts.jsonl",))
    return target, folder, prompts, model.source, video, camera


def run_camera_move(train_spec) -> str | None:
    """The camera move a run was trained on: ``winnow camera-loras`` records it in the selection
    manifest the run trained on; None for any other run."""
    from pipeline.commands.camera_loras import MOVE_META
    from pipeline.contract import layout

    sel = train_spec.data.selection
    if not sel:
        return None
    try:
        meta = layout.read_schema(sel).metadata or {}
    except (OSError, ValueError):
        return None
    move = meta.get(MOVE_META.encode())
    return move.decode() if move else None


def camera_control(spec: EvalSpec, model, outs: list, prompts: list, cond, log) -> dict | None:
    """For a camera-move LoRA's run (``winnow camera-loras``): how many of its sample videos move
    as it was trained to (their camera_move measured as curation measures clips), against the same
    prompts, frames and seeds sampled with the adapter switched off."""
    from collections import Counter

    from training.generate import generate
    from training.lora import adapters_disabled
    from video.motion import camera_moves_of

    move = run_camera_move(model.spec)
    if move is None or not any(len(frames) > 1 for frames in outs):
        return None
    fps = float(model.spec.video.fps)
    got = camera_moves_of(outs, fps)
    doc = {"move": move, "share": round(got.count(move) / len(got), 4), "moves": dict(Counter(map(str, got))),
           "base_share": None, "base_moves": None, "samples": len(got)}
    with adapters_disabled(model.comps.unet) as switched:
        if switched:
            if log:
                print(f"eval: sampling the base (adapter off) for {move}'s controllability", file=log)
            base = camera_moves_of(generate(model, prompts, cond, spec.steps, spec.guidance, spec.size,
                                            spec.num_frames, spec.seed), fps)
            doc["base_share"] = round(base.count(move) / len(base), 4)
            doc["base_moves"] = dict(Counter(map(str, base)))
    return doc


def _gif_frames(path: str) -> list:
    import io

    from pipeline.contract import storage

    return gif_frames(io.BytesIO(storage.read_bytes(path)) if storage.is_url(path) else path)


def run(spec: EvalSpec, log=sys.stderr) -> EvalResult:
    from pipeline.contract import storage

    plan(spec)
    with storage.scratch("winnow-eval-") as stage:
        return _run(spec, log, os.path.join(stage, "samples"))


def _run(spec: EvalSpec, log, stage: str) -> EvalResult:
    import warnings

    from pipeline.contract import storage

    started = time.time()
    if spec.held_out and spec.run:
        doc, source = interp_scores(spec, log)
        return EvalResult(None, None, {"clips": {"scored": doc["windows"], "skipped": doc["skipped"]}}, None, None,
                          spec.seed, round(time.time() - started, 2), weights=source, interpolation=doc,
                          print_json=spec.json)
    caught_all: list = []
    images, weights, video, prompts, camera = spec.images, None, False, None, None
    shown = images
    if spec.run:
        shown, images, prompts, weights, video, camera = _generate(spec, log, stage)
    elif spec.prompts:
        prompts = read_prompts(spec.prompts, spec.max_images)
    counts, fid_value, score, consistency, clip_name, cosine = {}, None, None, None, None, None
    if prompts is not None:
        from training.evaluate import ClipScorer

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            clip = ClipScorer(spec.clip_model, spec.clip_pretrained, spec.seed)
        caught_all += caught
        clip_name = clip.label
        if clip.random:
            caught_all.append(f"CLIP {clip.name} has random weights: its CLIP scores mean nothing beyond comparing "
                              f"runs scored with it; give --clip-model and --clip-pretrained")
        score, consistency, n, cosine = _clip_scores(clip, images, prompts, video, spec)
        counts["images"] = n
    if spec.reference:
        from pipeline.models.inception import inception
        from training.evaluate import fid_of, stats_of

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if spec.fid_weights == "random":
                model = inception(spec.fid_weights, spec.seed)
            else:
                with storage.local_copy(spec.fid_weights) as weights_file:
                    model = inception(weights_file, spec.seed)
        caught_all += caught
        stats = {}
        for name, root in (("images", images), ("reference", spec.reference)):
            skipped: dict = {}
            ref_key = (
                storage.absolute(root) if storage.is_url(root) else os.path.realpath(root),
                spec.fid_weights,
                spec.seed,
                spec.max_images,
                _tree_stamp(root),
            )
            if name == "reference" and ref_key in _REFERENCE_STATS:     # a study scores every cell against it
                stats[name], skipped = _REFERENCE_STATS[ref_key]
            elif video and name == "images":  # FID of a model's videos: over all their frames
                frames = (
                    f for p in storage.listdir(root) if p.endswith(".gif") for f in _gif_frames(storage.join(root, p))
                )
                stats[name] = stats_of(model, inception_batches(frames, spec.batch))
            else:
                stats[name] = stats_of(model, image_batches(root, spec.max_images, spec.batch, skipped))
                if name == "reference":
                    _REFERENCE_STATS[ref_key] = (stats[name], dict(skipped))
            counts[name] = {**counts.get(name, {}), "scored": stats[name].n, "skipped": dict(sorted(skipped.items()))}
            if stats[name].n < 2:
                raise ConfigError(f"--{name}: {root!r} holds {stats[name].n} readable images; FID needs at least 2 "
                                  f"(skipped: {counts[name]['skipped']})")
        fid_value = round(fid_of(stats["images"], stats["reference"]), 6)
        few = min(stats["images"].n, stats["reference"].n)
        if few < FID_MIN_IMAGES:
            caught_all.append(f"FID from {few} images: the 2048-d covariances have rank at most {few - 1}, so the "
                              f"value is biased upward and depends on the count (Chong & Forsyth, 2020); compare it "
                              f"only with FIDs over the same number of images, or use {FID_MIN_IMAGES:,}+")
    messages = [str(getattr(w, "message", w)) for w in caught_all]
    return EvalResult(
        shown,
        spec.reference,
        counts,
        fid_value,
        spec.fid_weights,
        spec.seed,
        round(time.time() - started, 2),
        None if score is None else round(score, 4),
        clip_name,
        None if consistency is None else round(consistency, 4),
        weights,
        len(prompts) if spec.run else 0,
        None if cosine is None else round(cosine, 4),
        camera=camera,
        warnings=messages,
        print_json=spec.json,
    )


# below this many images a FID's 2048-d covariance is rank-deficient: the value carries a warning
FID_MIN_IMAGES = 2048

# reference statistics already computed in this process, by (folder, weights, seed, limit, stamp)
_REFERENCE_STATS: dict = {}


def _tree_stamp(root: str) -> tuple:
    """(files, bytes, newest mtime) under ``root`` (on a store: files, bytes, a digest of the listing):
    a changed reference is read again."""
    from pipeline.contract import storage

    if storage.is_url(root):
        found = storage.walk(root)
        import hashlib

        digest = hashlib.sha256(json.dumps([(f["path"], f["bytes"]) for f in found]).encode()).hexdigest()
        return len(found), sum(f["bytes"] for f in found), digest
    n = size = newest = 0
    for d, _, fs in os.walk(root):
        for f in fs:
            try:
                st = os.stat(os.path.join(d, f))
            except OSError:
                continue
            n, size, newest = n + 1, size + st.st_size, max(newest, st.st_mtime_ns)
    return n, size, newest


def _clip_scores(clip, folder: str, prompts: list[str], video: bool, spec: EvalSpec):
    """(mean CLIP score, frame consistency or None, counts, mean cosine) of ``folder``'s images (or GIFs) against
    ``prompts``: by prompts.jsonl when the folder has one, else its files in sorted order."""
    from pipeline.contract import storage

    listing = storage.join(folder, "prompts.jsonl")
    if storage.isfile(listing):
        pairs = [
            (p["file"], p["prompt"]) for p in map(json.loads, filter(None, storage.read_text(listing).splitlines()))
        ]
    else:
        files = [_rel(f, folder) for f in _files(folder, spec.max_images)]
        if len(files) != len(prompts):
            raise ConfigError(f"--prompts: {len(prompts)} prompts for {len(files)} files in {folder!r}; the prompt "
                              f"file's lines pair with the folder's files in sorted order")
        pairs = list(zip(files, prompts, strict=True))
    skipped: dict = {}
    if video:
        scores, consistency, cos = zip(
            *(clip.video(_gif_frames(storage.join(folder, f)), p) for f, p in pairs), strict=True
        )
        return float(np.mean(scores)), float(np.mean(consistency)), {"scored": len(pairs), "skipped": {}}, \
            float(np.mean(cos))
    prompts_of: dict[str, list[str]] = {}          # a file listed with several prompts is scored with each
    for f, p in pairs:
        prompts_of.setdefault(f, []).append(p)
    paired = ((img, p) for name, img in read_images(folder, spec.max_images, skipped) for p in prompts_of.get(name, ()))
    scored = [clip.pairs([im for im, _ in chunk], [p for _, p in chunk])        # one batch of images in memory
              for chunk in _batches(paired, spec.batch)]
    if not scored:
        raise ConfigError(f"--images: no readable image of {folder!r} pairs with a prompt (skipped: {skipped})")
    scores, cos = (np.concatenate(parts) for parts in zip(*scored, strict=True))
    return float(scores.mean()), None, {"scored": len(scores), "skipped": dict(sorted(skipped.items()))}, \
        float(cos.mean())


def arguments(parser) -> None:
    src = parser.add_argument_group("what to score")
    src.add_argument("--run", help="a `winnow train` output folder: sample its model once per prompt")
    src.add_argument("--checkpoint", help="with --run: a checkpoint folder instead of the run's final/ or lora/")
    src.add_argument("--images", help="a folder of images to score as it is")
    src.add_argument("--prompts", help="text file (one prompt per line) or a `winnow curate` output (kept captions)")
    src.add_argument("--frames", help="image-to-video runs: folder of conditioning images, paired with the prompts")
    src.add_argument("--lpips-alexnet", help="with --clips: torchvision's AlexNet weights (alexnet-owt-*.pth), to "
                                             "add LPIPS (Zhang et al., 2018) beside PSNR and SSIM")
    src.add_argument("--lpips-linear", help="with --lpips-alexnet: LPIPS's linear layers (the lpips package's "
                                            "weights/v0.1/alex.pth)")
    src.add_argument("--clips", dest="held_out",
                     help="interpolation runs (svd_interp): folder of held-out videos; the frames between each "
                          "window's first and last are predicted and scored against the true ones")
    gen = parser.add_argument_group("sampling (--run)")
    gen.add_argument("--num", type=int, default=64, help="prompts sampled (the first N)")
    gen.add_argument("--steps", type=int, default=20, help="sampler steps")
    gen.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (images)")
    gen.add_argument("--size", type=int, help="image side in pixels (default: the run's data.resolution, at most 512)")
    gen.add_argument("--num-frames", type=int, help="frames per video (default: the run's first video bucket's)")
    gen.add_argument("--out", help="where the samples go (default OUTPUT/eval/<final|lora|checkpoint_N>)")
    met = parser.add_argument_group("metrics")
    met.add_argument("--reference", help="folder of reference images, or a shard set, for FID")
    met.add_argument("--fid-weights", help="torchvision or pytorch-fid Inception-v3 weights file, or 'random'")
    met.add_argument("--clip-model", help="open_clip model name for the CLIP score (default: the tiny random CLIP)")
    met.add_argument("--clip-pretrained", help="its weights: an open_clip tag in the local cache, a file or a folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the samples and of random networks")
    parser.add_argument("--max-images", type=int, default=50_000, help="images read per folder (sorted order)")
    parser.add_argument("--json", action="store_true", help="end with one line holding the result as JSON")


def from_args(args) -> EvalSpec:
    for name in ("num", "steps", "max_images"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: must be at least 1")
    spec = EvalSpec(args.images, args.reference, args.fid_weights, args.run, args.checkpoint, args.prompts, args.frames,
                    args.num, args.steps, args.guidance, args.size, args.num_frames, args.clip_model,
                    args.clip_pretrained, args.out, args.seed, args.max_images, json=args.json, held_out=args.held_out,
                    lpips_alexnet=args.lpips_alexnet, lpips_linear=args.lpips_linear)
    plan(spec)
    return spec


def format_summary(r: EvalResult) -> str:
    lines = [f"winnow eval: {r.images or r.weights}" + (f" against {r.reference}" if r.reference else "")]
    if r.weights:
        lines.append(f"  model      {r.weights}" + ("" if r.interpolation else f": {r.generated} samples"))
    for name, c in r.counts.items():
        skipped = ", ".join(f"{k} {v}" for k, v in c.get("skipped", {}).items()) or "none"
        lines.append(f"  {name:<10} {c['scored']:>7} scored; skipped: {skipped}")
    if r.clip_score is not None:
        lines.append(
            f"  CLIP score {r.clip_score:.2f}  (100 x max(cos, 0); mean cosine {r.clip_cosine:.4f}; {r.clip_model})"
        )
    if r.frame_consistency is not None:
        lines.append(f"  frame consistency {r.frame_consistency:.4f}  (cosine of consecutive frames' CLIP embeddings)")
    if r.fid is not None:
        lines.append(f"  FID        {r.fid:.4f}  (Inception-v3 pool features; weights {r.fid_weights})")
    if r.interpolation:
        d = r.interpolation
        lines.append(f"  interpolation {d['frames']} frames between {d['windows']} pairs ({d['factor']}x, "
                     f"{d['rate_fps']:g} fps): PSNR {d['model_psnr']:.2f} dB, SSIM {d['model_ssim']:.4f}; "
                     f"linear blend PSNR {d['blend_psnr']:.2f} dB, SSIM {d['blend_ssim']:.4f}"
                     + (f"; LPIPS {d['model_lpips']:.4f} against the blend's {d['blend_lpips']:.4f}"
                        if "model_lpips" in d else ""))
    if r.camera:
        c = r.camera
        base = "" if c["base_share"] is None else f" against {100 * c['base_share']:.0f} % for the base"
        lines.append(f"  camera     {100 * c['share']:.0f} % of {c['samples']} samples move {c['move']}{base} "
                     f"(measured: {', '.join(f'{k} {v}' for k, v in sorted(c['moves'].items()))})")
    lines += [f"  warning: {w}" for w in r.warnings]
    lines.append(f"  wall time  {r.wall_s:.1f} s")
    if r.print_json:
        lines.append(json.dumps(r.to_dict(), sort_keys=True))
    return "\n".join(lines)
