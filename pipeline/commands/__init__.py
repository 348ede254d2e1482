"""One module per ``winnow`` command, each with the same small protocol:

* ``NAME`` and ``DESCRIPTION`` (``winnow NAME --help``; the one line ``winnow --help`` shows is in
  ``COMMANDS`` below, so listing the commands imports none of them);
* ``arguments(parser)`` adds the command's arguments; ``from_args(args)`` loads its spec from them
  (a YAML file plus ``--set`` overrides, or the short form), raising ``ConfigError`` before Ray starts;
* ``plan(spec)`` works out what to do without doing it; ``run(spec, log)`` does it (resuming what
  an earlier run finished) and returns a result; ``format_summary(result)`` is what the CLI prints.

``pipeline/cli.py`` is the table of these modules; ``jobs/run.py`` dispatches a spec's ``kind:``
to the same table. A new command is a new module here and one entry in ``COMMANDS``.
"""
from __future__ import annotations

import importlib

# command name -> (module, one line of help); a module is imported only when its command runs
COMMANDS = {
    "stages": ("pipeline.commands.stages", "list the curate stages with their options, defaults and help"),
    "curate": ("pipeline.commands.curate", "annotate a corpus and write shards"),
    "train": ("pipeline.commands.train", "train SD 1.x/2.x, SDXL or SVD (full or LoRA) on curated shards (Ray Train)"),
    "sweep": ("pipeline.commands.sweep", "sweep filter thresholds over annotations (tables, plots, contact sheets)"),
    "select": ("pipeline.commands.select", "write the samples of a selection as a new shard set"),
    "report": ("pipeline.commands.report", "write the HTML report of a curate or select output"),
    "curriculum": ("pipeline.commands.curriculum", "train staged: image -> low-res video -> image-to-video (SVD)"),
    "camera-loras": ("pipeline.commands.camera_loras", "train one temporal LoRA per camera move (SVD's camera LoRAs)"),
    "interpolate": ("pipeline.commands.interpolate", "multiply a video's frame rate with an svd_interp run"),
    "inflate": ("pipeline.commands.inflate", "inflate an image UNet (and VAE) into SVD's video models"),
    "submit": ("pipeline.commands.submit", "submit a spec to a Ray cluster as a job (checked here first)"),
    "jobs": ("pipeline.commands.jobs", "list a cluster's jobs, show one's status or logs, stop one"),
    "eval": ("pipeline.commands.eval", "score a trained run or a folder of images: CLIP score, FID"),
    "study": ("pipeline.commands.study", "train and evaluate a short run per sweep cell: score vs data kept"),
    "prefer": ("pipeline.commands.prefer", "rank runs by people's pairwise votes on their samples (a web page)"),
}


def get(name: str):
    return importlib.import_module(COMMANDS[name][0])


def add_set_argument(parser, example: str = "") -> None:
    """The ``--set dotted.key=value`` overrides every spec-driven command takes."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec value" + (f", e.g. --set {example}" if example else "") + " (repeatable)")


def command_of(argv: list[str]) -> str:
    """The command a spec runs: its ``kind:``, or for a spec without one, what its keys say."""
    from pipeline.contract.config import SPEC_KINDS, ConfigError, load_yaml

    spec = next((a for a in argv if a.endswith((".yaml", ".yml"))), None)
    try:
        data = load_yaml(spec) if spec else {}
    except ConfigError:
        return "curate"          # let the command report the bad file
    if data.get("kind") in SPEC_KINDS:
        return data["kind"]
    if "kind" in data:
        return "curate"          # the curate spec parser names the unknown kind
    if "data" in data:
        return "train"
    if "filters" in data and "annotations" in data:
        return "sweep"
    if "selection" in data or "runs" in data:
        return "select"
    return "curate"
