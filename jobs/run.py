"""Entry point that ``ray job submit`` runs: ``python -m jobs.run SPEC.yaml [--set k=v ...]``.

The spec's ``kind:`` (curate, train, sweep, select or curriculum) names the command. A spec without one is
routed by its keys, as before ``kind:`` existed: ``data:`` a training job, ``annotations:`` +
``filters:`` a sweep, ``selection:`` or ``runs:`` a select job, otherwise a curation job.
Inside a Ray job ``RAY_ADDRESS`` is set, so the run joins the cluster instead of starting one.
"""
from __future__ import annotations

import sys

from pipeline.cli import main
from pipeline.contract.config import SPEC_KINDS, ConfigError, load_yaml


def command(argv: list[str]) -> str:
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


if __name__ == "__main__":
    sys.exit(main([command(sys.argv[1:]), *sys.argv[1:]]))
