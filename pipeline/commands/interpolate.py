"""``winnow interpolate``: a video's frame rate multiplied by an interpolation run (``model.kind:
svd_interp``): every gap between two frames filled with ``factor - 1`` frames the model predicts,
the frames given passed through (at the run's bucket size), written as H.264 at ``factor`` times
the input's rate. The sampler is ``training.generate.interpolate_video``."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from fractions import Fraction

from pipeline.contract.config import ConfigError

NAME = "interpolate"
DESCRIPTION = """\
Multiply a video's frame rate with a trained interpolation run (model.kind svd_interp).

  winnow interpolate --run RUN INPUT.mp4 --out OUTPUT.mp4 [--factor 4] [--steps 25]

N frames at r fps in, (N - 1) x factor + 1 frames at factor x r fps out, at the run's bucket size;
the input's own frames pass through. Score a run on held-out clips with `winnow eval --run RUN --clips DIR`.
"""


@dataclass
class InterpolateSpec:
    run: str
    input: str
    out: str
    factor: int = 4
    steps: int = 25
    seed: int = 0
    guidance: float = 1.0
    max_frames: int = 2000
    checkpoint: str | None = None


def arguments(parser) -> None:
    parser.add_argument("input", help="the video to interpolate")
    parser.add_argument("--run", required=True, help="an svd_interp `winnow train` (or curriculum stage) output")
    parser.add_argument("--checkpoint", help="a checkpoint folder of the run instead of its final/")
    parser.add_argument("--out", required=True, help="the H.264 video to write (.mp4)")
    parser.add_argument("--factor", type=int, default=4, help="frames per input frame gap in the output (2 or 4)")
    parser.add_argument("--steps", type=int, default=25, help="sampler steps per gap")
    parser.add_argument("--guidance", type=float, default=1.0,
                        help="classifier-free guidance against the model without its given frames (1: none)")
    parser.add_argument("--seed", type=int, default=0, help="gap k is seeded seed + k")
    parser.add_argument("--max-frames", type=int, default=2000, help="refuse a longer input (frames held in memory)")


def from_args(args) -> InterpolateSpec:
    spec = InterpolateSpec(args.run, args.input, args.out, args.factor, args.steps, args.seed, args.guidance,
                           args.max_frames, args.checkpoint)
    plan(spec)
    return spec


def plan(spec: InterpolateSpec) -> dict:
    """Check everything that can be checked before the model loads."""
    import os

    from pipeline.contract import storage
    from training import families
    from training.generate import check_factor, interp_frames, run_spec, weights_of

    if spec.steps < 1 or spec.max_frames < 2:
        raise ConfigError("--steps must be at least 1 and --max-frames at least 2")
    ts = run_spec(spec.run)
    if not families.get(ts.model.kind).interpolates():
        raise ConfigError(f"--run: model.kind {ts.model.kind} does not interpolate; give an svd_interp run")
    check_factor(ts, spec.factor)
    weights = weights_of(spec.run, spec.checkpoint)
    if not storage.isfile(spec.input):
        raise ConfigError(f"input: {spec.input!r} is not a file")
    if not storage.is_url(spec.out) and os.path.abspath(spec.out) == os.path.abspath(spec.input):
        raise ConfigError("--out: the output would overwrite the input; give another path")
    storage.check_writable(spec.out, "--out")
    frames, height, width = interp_frames(ts)
    return {"weights": weights, "size": f"{width}x{height}", "model_frames": frames, "factor": spec.factor}


def read_frames(source: str, size: tuple[int, int], max_frames: int) -> tuple[list, float]:
    """(the video's frames as PIL images resized to ``size``, its frame rate), through the bounded
    opener; more than ``max_frames`` frames is refused."""
    import av
    from PIL import Image

    from pipeline.contract import storage
    from pipeline.contract.media import MediaError, open_video

    data = storage.read_bytes(source, limit=4 * 2 ** 30) if storage.is_url(source) else source
    frames, times = [], []
    try:
        with open_video(data) as container:
            stream = container.streams.video[0]
            for frame in container.decode(stream):
                if len(frames) == max_frames:
                    raise ConfigError(f"input: more than --max-frames {max_frames} frames; cut the video or raise it")
                frames.append(frame.to_image().convert("RGB").resize(size, Image.BICUBIC))
                times.append(float(frame.time) if frame.time is not None else len(times))
            rate = float(stream.average_rate) if stream.average_rate else 0.0
    except (MediaError, av.error.FFmpegError) as exc:
        raise ConfigError(f"input: {source!r} cannot be read as a video ({exc})") from None
    if len(frames) < 2:
        raise ConfigError(f"input: {source!r} has {len(frames)} frame(s); at least 2 are needed")
    if rate <= 0:
        rate = (len(times) - 1) / max(times[-1] - times[0], 1e-6)
    return frames, rate


def write_h264(frames: list, target: str, fps: float, crf: int = 18) -> None:
    import av

    from pipeline.contract import storage

    with storage.local_target(target) as tmp, av.open(tmp, "w", format="mp4") as box:
        stream = box.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = frames[0].width, frames[0].height, "yuv420p"
        stream.options = {"crf": str(crf)}
        for im in frames:
            box.mux(stream.encode(av.VideoFrame.from_image(im)))
        box.mux(stream.encode())


@dataclass
class InterpolateResult:
    out: str
    frames_in: int
    frames_out: int
    fps_in: float
    fps_out: float
    size: str
    weights: str
    wall_s: float


def run(spec: InterpolateSpec, log=sys.stderr) -> InterpolateResult:
    from tqdm.auto import tqdm

    from training.generate import interp_frames, interpolate_video, load_run

    started = time.time()
    model = load_run(spec.run, spec.checkpoint)
    _, height, width = interp_frames(model.spec)
    frames, fps = read_frames(spec.input, (width, height), spec.max_frames)
    bar = tqdm(total=len(frames) - 1, desc="interpolate", unit="gap", file=log, disable=log is None)
    out = interpolate_video(model, frames, spec.factor, spec.steps, spec.seed, guidance=spec.guidance,
                            progress=bar.update)
    bar.close()
    write_h264(out, spec.out, fps * spec.factor)
    return InterpolateResult(spec.out, len(frames), len(out), round(fps, 4), round(fps * spec.factor, 4),
                             f"{width}x{height}", model.source, round(time.time() - started, 2))


def format_summary(r: InterpolateResult) -> str:
    return (f"winnow interpolate: {r.out}\n  {r.frames_in} frames at {r.fps_in:g} fps -> {r.frames_out} frames at "
            f"{r.fps_out:g} fps, {r.size} ({r.weights}; {r.wall_s:.1f} s)")


__all__ = ["InterpolateSpec", "plan", "read_frames", "run", "write_h264"]
