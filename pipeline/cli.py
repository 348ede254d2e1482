"""The ``winnow`` command line."""
from __future__ import annotations

import argparse
import os
import sys

from pipeline.contract.config import ConfigError, apply_overrides, load_yaml

CURATE_HELP = """\
Curate a corpus into WebDataset shards and one annotation table.

  winnow curate SPEC.yaml [--set dotted.key=value ...]
  winnow curate --input PATH --output DIR [--samples-per-shard N] [--set ...]

The input may be a folder of images (with optional NAME.txt captions), a LAION-style
parquet of paths + captions, img2dataset .tar shards, or a folder (or parquet) of videos,
which are cut into clips (see jobs/lvd_video_curation.yaml). Re-running the same command on the
same output folder resumes an interrupted run. See jobs/*.yaml for full specs.
"""


def format_summary(result) -> str:
    lines = [f"winnow curate: {result.output}"]
    v = result.videos
    if v:
        lines += [f"  videos    {v['inputs']:>8}",
                  f"    with clips           {v['with_clips']:>6}",
                  f"    without clips        {v['without_clips']:>6}"]
        lines += [f"      {reason:<20} {n:>6}" for reason, n in v["reasons"].items()]
        lines.append("  clips and segments (a segment too short to be a clip is a rejected row)")
    lines += [f"  inputs    {result.inputs:>8}",
             f"  kept      {result.kept:>8}  ({100 * result.kept / max(1, result.inputs):.1f} %)",
             f"  rejected  {result.rejected:>8}"]
    for reason, n in result.reasons.items():
        lines.append(f"    {reason:<22} {n:>6}")
    if getattr(result, "sidecars", 0):
        lines.append(f"  sidecars  {result.sidecars:>8}  (captions and JSON beside the samples; not samples)")
    if result.stage_seconds:
        lines.append("  stage time (worker seconds, all workers)")
        for stage, s in result.stage_seconds.items():
            rate = f"{result.inputs / s:,.0f} samples/s per worker" if s >= 0.005 else "negligible"
            lines.append(f"    {stage:<22} {s:>8.2f} s  ({rate})")
    if result.phases:
        lines.append("  phases  " + ", ".join(f"{k} {v:.1f} s" for k, v in result.phases.items()))
    lines.append(f"  wall time {result.wall_seconds:.1f} s; shards in {os.path.join(result.output, 'shards')}")
    if result.report:
        lines.append(f"  report    {result.report}")
    return "\n".join(lines)


def cmd_curate(args) -> int:
    from pipeline import spec as specmod

    if args.spec is None and (args.input is None or args.output is None):
        raise ConfigError("give a SPEC.yaml, or both --input PATH and --output DIR")
    base = {"input": {"path": args.input}, "output": {"path": args.output, "samples_per_shard": args.samples_per_shard}}
    spec = specmod.load(args.spec, args.set, base=base)
    from pipeline import curate

    result = curate.run(spec)
    print(format_summary(result))
    return 0


TRAIN_HELP = """\
Train SD 1.x/2.x or SDXL on curated shards as a Ray Train job.

  winnow train SPEC.yaml [--set dotted.key=value ...]

The spec names the shard sets (`winnow curate` outputs), the model (a diffusers pipeline folder,
or the tiny random preset), the objective, optimizer, EMA and Ray workers; see jobs/train_sd15.yaml
and jobs/train_sdxl.yaml. Running the same command on the same output.path resumes from the last
checkpoint, to the sample; the end of the run exports OUTPUT/final, a diffusers pipeline folder.
"""


def cmd_train(args) -> int:
    from training import spec as trainspec
    from training import trainer

    spec = trainspec.load(args.spec, args.set)
    result = trainer.run(spec)
    print(trainer.format_summary(result))
    return 0


SWEEP_HELP = """\
Sweep filter thresholds over annotation tables, without re-running a model.

  winnow sweep SPEC.yaml [--set dotted.key=value ...]

Per annotation: drop fractions from the bad end (SVD's 12.5/25/50 %) and/or absolute thresholds;
every level alone and every AND-combination. Writes cells.csv / cells.md, a selection manifest per
cell (selections/cell_NNN.parquet), overlap.csv, plots/ and contact sheets/. See
jobs/sweep_svd_filters.yaml and jobs/sweep_laion_aesthetic.yaml.
"""


def cmd_sweep(args) -> int:
    from curation import sweep

    spec = sweep.load(args.spec, args.set)
    print(sweep.format_summary(sweep.run(spec)))
    return 0


SELECT_HELP = """\
Materialise a selection into a new shard set, copied from the source runs' shards.

  winnow select SPEC.yaml [--set dotted.key=value ...]
  winnow select --selection SWEEP/selections/cell_NNN.parquet --output DIR [--set ...]

The selection is a manifest from `winnow sweep` (its runs are read from the manifest) and/or inline
filters (one drop_fraction or threshold per annotation, ANDed). The output is a run folder like
`winnow curate`'s: shards/, annotations.parquet, embeddings/, summary.json, report.html. Re-running
the same command resumes. See jobs/select_laion_aesthetic.yaml.
"""


def cmd_select(args) -> int:
    from pipeline import selection

    data = load_yaml(args.spec) if args.spec else {}
    if args.selection:
        data["selection"] = args.selection
    if args.output:
        data.setdefault("output", {})["path"] = args.output
    spec = selection.parse(apply_overrides(data, args.set))
    result = selection.run(spec)
    print(selection.format_summary(result))
    return 0


REPORT_HELP = """\
Write the HTML report of a `winnow curate` (or `winnow select`) output folder.

  winnow report RUN_DIR [--out FILE] [--examples N]

One self-contained file (images embedded, no network): the funnel, score histograms, aspect-ratio
and bucket distribution, per-stage throughput, kept and rejected examples per reason, and the spec.
`winnow curate` writes RUN_DIR/report.html at the end of every run.
"""


def cmd_report(args) -> int:
    from pipeline import report

    path = report.write(args.run_dir, args.out, examples=args.examples)
    print(f"winnow report: {path}")
    return 0


def describe_stages(only: str | None = None) -> str:
    """Every registered stage with its options, types, defaults and help (from the typed configs)."""
    from pipeline import registry
    from pipeline.contract.config import describe

    names = [only] if only else sorted(registry.STAGES)
    lines = []
    for name in names:
        cls = registry.get(name)
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        lines.append(f"{name}: {doc}")
        lines += describe(cls.Config, "    ")
        lines.append("")
    return "\n".join(lines).rstrip()


def cmd_stages(args) -> int:
    from pipeline import registry

    if args.name and args.name not in registry.STAGES:
        registry.get(args.name)                           # raises with a suggestion
    print(describe_stages(args.name))
    return 0


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as pkg_version

    try:
        return pkg_version("winnow")
    except PackageNotFoundError:
        return "unknown (not installed; run from a checkout)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="winnow", description="Curate image/video corpora for diffusion training, on Ray.")
    parser.add_argument("--version", action="version", version=f"winnow {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    st = sub.add_parser("stages", help="list the curate stages with their options, defaults and help",
                        description="List the stages a curate spec's `stages:` may name, with every option.")
    st.add_argument("name", nargs="?", help="one stage (default: all)")
    st.set_defaults(func=cmd_stages)
    cur = sub.add_parser("curate", help="annotate a corpus and write shards", description=CURATE_HELP,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    cur.add_argument("spec", nargs="?", help="job spec YAML (see jobs/)")
    cur.add_argument("--input", help="input path (short form, defaults for everything else)")
    cur.add_argument("--output", help="output folder")
    cur.add_argument("--samples-per-shard", type=int, default=None, help="samples per output shard (default 1000)")
    cur.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a spec value, e.g. --set stages.decode.max_side=512 (repeatable)")
    cur.set_defaults(func=cmd_curate)
    tr = sub.add_parser("train", help="train SD / SDXL on curated shards (Ray Train)", description=TRAIN_HELP,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    tr.add_argument("spec", help="train spec YAML (see jobs/train_sd15.yaml)")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a spec value, e.g. --set train.max_steps=500 (repeatable)")
    tr.set_defaults(func=cmd_train)
    sw = sub.add_parser("sweep", help="sweep filter thresholds over annotations (tables, plots, contact sheets)",
                        description=SWEEP_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sw.add_argument("spec", help="sweep spec YAML (see jobs/sweep_svd_filters.yaml)")
    sw.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec value (repeatable)")
    sw.set_defaults(func=cmd_sweep)
    se = sub.add_parser("select", help="write the samples of a selection as a new shard set", description=SELECT_HELP,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    se.add_argument("spec", nargs="?", help="select spec YAML (see jobs/select_laion_aesthetic.yaml)")
    se.add_argument("--selection", help="selection manifest (winnow sweep's selections/cell_NNN.parquet)")
    se.add_argument("--output", help="output folder")
    se.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec value (repeatable)")
    se.set_defaults(func=cmd_select)
    rp = sub.add_parser("report", help="write the HTML report of a curate or select output", description=REPORT_HELP,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    rp.add_argument("run_dir", help="a `winnow curate` or `winnow select` output folder")
    rp.add_argument("--out", help="report file (default RUN_DIR/report.html)")
    rp.add_argument("--examples", type=int, default=8, help="example thumbnails per reason (default 8)")
    rp.set_defaults(func=cmd_report)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"winnow: bad spec: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:   # a checkpoint winnow refuses to load (training.checkpoint.CheckpointError)
        if type(exc).__name__ != "CheckpointError":
            raise
        print(f"winnow: bad checkpoint: {exc}", file=sys.stderr)
        return 2
    except KeyError as exc:       # an unknown stage name given to `winnow stages`
        if args.command != "stages":
            raise
        print(f"winnow: {exc.args[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
