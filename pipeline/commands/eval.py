"""``winnow eval --images A --reference B``: FID between two folders of images.

The first part of issue 18's evaluation: scoring images that exist (a model's samples, a
curated subset) against a reference set. Generating images from a run and the CLIP score of
prompts come next; ``training/evaluate.py`` already holds the CLIP score.

Every file under the two folders is read as winnow reads inputs (regular files only, bounded
reads, the decoder's pixel and memory caps); a file that is not a readable image is counted
under its reason and left out, and the counts say so. Images are resized to Inception's 299 x
299 (bicubic) and scored with Inception-v3 pool features; the weights come from a file
(torchvision's ``inception_v3_google`` state dict) or are ``random`` (seeded; the numbers then
compare runs scored with the same network and mean nothing else).
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from pipeline.contract.config import ConfigError

NAME = "eval"
DESCRIPTION = """\
Score images against a reference set: FID (Inception-v3 pool features, Frechet distance in float64).

  winnow eval --images DIR --reference DIR --fid-weights PATH|random [--json]

PATH is torchvision's Inception-v3 weights file (inception_v3_google-*.pth); `random` is a seeded
random network for tests and demos, whose FID means nothing beyond comparing runs scored with it.
"""


@dataclass
class EvalSpec:
    images: str
    reference: str
    fid_weights: str
    seed: int = 0
    max_images: int = 50_000
    batch: int = 32
    json: bool = False


@dataclass
class EvalResult:
    images: str
    reference: str
    counts: dict               # per set: scored, skipped (by reason)
    fid: float
    fid_weights: str
    seed: int
    wall_s: float
    warnings: list = field(default_factory=list)
    print_json: bool = False

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "print_json"}


def _files(root: str, limit: int) -> list[str]:
    out = []
    for d, dirs, fs in os.walk(root):
        dirs.sort()
        out += [os.path.join(d, f) for f in sorted(fs) if not f.lower().endswith((".txt", ".json", ".parquet"))]
    return out[:limit]


def image_batches(root: str, limit: int, batch: int, skipped: dict):
    """Uint8 (n, 3, 299, 299) batches of a folder's images, ``batch`` at a time (memory stays one
    batch, whatever the folder holds); files that are not readable images counted in ``skipped``."""
    from PIL import Image

    from curation.decode import DecodeConfig, DecodeError, decode_image
    from pipeline.contract.inputs import InputPolicy, InputRejected, read_local
    from training.evaluate import INCEPTION_SIZE

    policy, cfg = InputPolicy(root=os.path.realpath(root)), DecodeConfig(max_side=1024)
    images = []
    for path in _files(root, limit):
        try:
            img, _, _ = decode_image(read_local(path, policy), cfg)
        except (DecodeError, InputRejected, OSError) as exc:
            reason = str(exc).split(":", 1)[0] if isinstance(exc, (DecodeError, InputRejected)) else type(exc).__name__
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        img = img.convert("RGB").resize((INCEPTION_SIZE, INCEPTION_SIZE), Image.BICUBIC)
        images.append(np.asarray(img).transpose(2, 0, 1))
        if len(images) == batch:
            yield np.stack(images)
            images = []
    if images:
        yield np.stack(images)


def plan(spec: EvalSpec) -> dict:
    for what, path in (("--images", spec.images), ("--reference", spec.reference)):
        if not os.path.isdir(path):
            raise ConfigError(f"{what}: {path!r} is not a folder of images")
    if spec.fid_weights != "random" and not os.path.isfile(spec.fid_weights):
        raise ConfigError(f"--fid-weights: {spec.fid_weights!r} is not a file; give torchvision's Inception-v3 "
                          f"weights (inception_v3_google-*.pth) or 'random' (tests and demos only)")
    return {"images": spec.images, "reference": spec.reference}


def run(spec: EvalSpec, log=sys.stderr) -> EvalResult:
    import warnings

    from training.evaluate import fid_of, inception, stats_of

    plan(spec)
    started = time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = inception(spec.fid_weights, spec.seed)
    stats, counts = {}, {}
    for name, root in (("images", spec.images), ("reference", spec.reference)):
        skipped: dict = {}
        stats[name] = stats_of(model, image_batches(root, spec.max_images, spec.batch, skipped))
        counts[name] = {"scored": stats[name].n, "skipped": dict(sorted(skipped.items()))}
        if stats[name].n < 2:
            raise ConfigError(f"--{name}: {root!r} holds {stats[name].n} readable images; FID needs at least 2 "
                              f"(skipped: {counts[name]['skipped']})")
    value = fid_of(stats["images"], stats["reference"])
    return EvalResult(spec.images, spec.reference, counts, round(value, 6), spec.fid_weights, spec.seed,
                      round(time.time() - started, 2), [str(w.message) for w in caught], spec.json)


def arguments(parser) -> None:
    parser.add_argument("--images", required=True, help="folder of images to score")
    parser.add_argument("--reference", required=True, help="folder of reference images")
    parser.add_argument("--fid-weights", required=True, help="torchvision Inception-v3 weights file, or 'random'")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random Inception")
    parser.add_argument("--max-images", type=int, default=50_000, help="images read per folder (sorted order)")
    parser.add_argument("--json", action="store_true", help="end with one line holding the result as JSON")


def from_args(args) -> EvalSpec:
    spec = EvalSpec(args.images, args.reference, args.fid_weights, args.seed, args.max_images, json=args.json)
    plan(spec)
    return spec


def format_summary(r: EvalResult) -> str:
    lines = [f"winnow eval: {r.images} against {r.reference}"]
    for name, c in r.counts.items():
        skipped = ", ".join(f"{k} {v}" for k, v in c["skipped"].items()) or "none"
        lines.append(f"  {name:<10} {c['scored']:>7} images scored; skipped: {skipped}")
    lines.append(f"  FID        {r.fid:.4f}  (Inception-v3 pool features; weights {r.fid_weights})")
    lines += [f"  warning: {w}" for w in r.warnings]
    lines.append(f"  wall time  {r.wall_s:.1f} s")
    if r.print_json:
        lines.append(json.dumps(r.to_dict(), sort_keys=True))
    return "\n".join(lines)
