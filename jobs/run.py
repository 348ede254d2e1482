"""Entry point that ``ray job submit`` runs: ``python -m jobs.run SPEC.yaml [--set k=v ...]``.

The spec's ``kind:`` (curate, train, sweep, select or curriculum) names the command. A spec without one is
routed by its keys, as before ``kind:`` existed: ``data:`` a training job, ``annotations:`` +
``filters:`` a sweep, ``selection:`` or ``runs:`` a select job, otherwise a curation job.
Inside a Ray job ``RAY_ADDRESS`` is set, so the run joins the cluster instead of starting one.
``winnow submit`` runs ``python -m jobs.run --spec-env VAR [--set ...]``: the spec's text comes in
the environment, so the spec file need not exist on the cluster.
"""
from __future__ import annotations

import sys

from pipeline.cli import main
from pipeline.commands import command_of

command = command_of      # the spec's kind (or, without one, its keys) names the command


def spec_from_env(argv: list[str]) -> list[str]:
    """``--spec-env VAR`` (what ``winnow submit`` sends): the spec's text is in the environment
    variable VAR; write it to a file of its own name in a fresh temporary folder and use that."""
    if "--spec-env" not in argv:
        return argv
    import os
    import tempfile

    from pipeline.commands.submit import SPEC_NAME_ENV

    at = argv.index("--spec-env")
    var = argv[at + 1]
    name = os.path.basename(os.environ.get(SPEC_NAME_ENV) or "spec.yaml")
    path = os.path.join(tempfile.mkdtemp(prefix="winnow-spec-"), name)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(os.environ[var])
    return [*argv[:at], path, *argv[at + 2:]]


if __name__ == "__main__":
    args = spec_from_env(sys.argv[1:])
    sys.exit(main([command(args), *args]))
