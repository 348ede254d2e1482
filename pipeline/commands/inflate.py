"""``winnow inflate``: an image UNet (and a pipeline's VAE) into SVD's spatio-temporal models,
starting as the image model frame by frame (``training/inflate.py``)."""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass

from pipeline.contract.config import ConfigError

NAME = "inflate"
DESCRIPTION = """\
Inflate an SD 1.x / 2.x UNet into SVD's UNetSpatioTemporalConditionModel.

  winnow inflate SOURCE OUTPUT [--in-channels 8] [--num-frames 14]

SOURCE is a diffusers UNet2DConditionModel folder, or a pipeline folder (its unet/, and its vae/
becomes OUTPUT/vae, an AutoencoderKLTemporalDecoder). Every spatial weight is copied, conv_in is
widened with zero channels (8: image-to-video), the temporal layers' outputs start at zero, so at
initialisation the video UNet is the image UNet on every frame. OUTPUT/inflation.json lists the
keys mapped, new and unused (unused is always empty: a layout winnow does not know is refused).
"""


@dataclass
class InflateSpec:
    source: str
    output: str
    in_channels: int = 8
    num_frames: int = 14


def arguments(parser) -> None:
    parser.add_argument("source", help="UNet2DConditionModel folder, or a diffusers pipeline folder")
    parser.add_argument("output", help="new folder for the UNetSpatioTemporalConditionModel")
    parser.add_argument(
        "--in-channels", type=int, default=8, help="8 for image-to-video (default), 4 for text-to-video"
    )
    parser.add_argument("--num-frames", type=int, default=14, help="the config's num_frames (default 14)")


def from_args(args) -> InflateSpec:
    return InflateSpec(args.source, args.output, args.in_channels, args.num_frames)


def plan(spec: InflateSpec) -> str:
    """The source folder; refuses a missing source or an output that is not empty (nothing is overwritten)."""
    from pipeline.contract import storage

    storage.check_writable(spec.output, "output")
    if not storage.isdir(spec.source):
        raise ConfigError(f"source {spec.source!r} is not a folder; give a UNet or pipeline folder")
    if storage.isfile(spec.output) or storage.listdir(spec.output):
        raise ConfigError(f"output {spec.output!r} exists and is not empty; give a new folder")
    if spec.in_channels < 4:
        raise ConfigError("--in-channels: at least the image UNet's 4 latent channels")
    return spec.source


def run(spec: InflateSpec, log=None) -> dict:
    from pipeline.contract import storage
    from training.inflate import InflationError, inflate_folder, write_summary

    plan(spec)
    if storage.is_url(spec.source) or storage.is_url(spec.output):
        # built in this node's scratch from a copy of the source, then written file by file,
        # model_index.json / config.json (what a reader checks first) last
        with storage.scratch("winnow-inflate-") as d, storage.local_copy(spec.source) as source:
            try:
                summary = inflate_folder(source, os.path.join(d, "out"), spec.in_channels, spec.num_frames)
            except InflationError as exc:
                raise ConfigError(f"{spec.source}: {exc}") from None
            summary["source"] = storage.absolute(spec.source)      # not this node's copy of it
            write_summary(os.path.join(d, "out"), summary)
            storage.copy_tree(os.path.join(d, "out"), spec.output, last=("model_index.json", "config.json"))
        return {**summary, "output": spec.output}
    # a fresh folder of our own beside the output (never a name a user's folder could have), renamed at the end
    parent = os.path.dirname(os.path.abspath(spec.output))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".winnow-inflate-", dir=parent)
    try:
        summary = inflate_folder(spec.source, tmp, spec.in_channels, spec.num_frames)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, InflationError):
            raise ConfigError(f"{spec.source}: {exc}") from None
        raise
    if os.path.isdir(spec.output):
        os.rmdir(spec.output)                         # empty (plan checked)
    os.replace(tmp, spec.output)
    return {**summary, "output": spec.output}


def format_summary(s: dict) -> str:
    lines = [f"winnow inflate: {s['output']}",
             f"  unet  {s['counts']['mapped']} weights mapped, {s['counts']['new']} new (temporal), "
             f"{s['counts']['unused']} unused; in_channels {s['in_channels']}"]
    if "skipped" in s.get("vae", {}):
        lines.append(f"  vae   not inflated: {s['vae']['skipped']}")
    elif "vae" in s:
        lines.append(f"  vae   {s['vae']['counts']['mapped']} mapped, {s['vae']['counts']['new']} new; "
                     f"post_quant_conv folded into the decoder (bias norm {s['vae']['post_quant_conv_bias_norm']:.3g})")
    lines.append(f"  keys  {s['output'].rstrip('/')}/inflation.json")
    return "\n".join(lines)
