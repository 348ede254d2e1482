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

try:
    import pyarrow  # noqa: F401 - every command needs these; a cluster without them fails here, not mid-job
    import ray  # noqa: F401
    import torch  # noqa: F401

    from pipeline.cli import main
    from pipeline.commands import command_of
    MISSING = None
except ImportError as exc:       # the job's interpreter lacks winnow's dependencies
    MISSING = exc
    command_of = None

command = command_of      # the spec's kind (or, without one, its keys) names the command


def missing_message(exc: ImportError) -> str:
    """One line that says what the cluster lacks and how to fix it."""
    name = exc.name or str(exc)
    return (f"winnow: this job's Python ({sys.executable}) cannot import {name!r}: winnow's dependencies are not "
            f"installed where the job runs. Install winnow on the cluster's nodes (pip install -e . from this "
            f"project, or bake it into the image) and submit with --installed, or start the cluster from the "
            f"environment that has it")


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
    folder = tempfile.mkdtemp(prefix="winnow-spec-")
    SPEC_FOLDERS.append(folder)              # removed when the command returns
    path = os.path.join(folder, name)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(os.environ[var])
    return [*argv[:at], path, *argv[at + 2:]]


SPEC_FOLDERS: list[str] = []


if __name__ == "__main__":
    if MISSING is not None:
        print(missing_message(MISSING), file=sys.stderr)
        sys.exit(3)
    import shutil

    args = spec_from_env(sys.argv[1:])
    try:
        code = main([command(args), *args])
    finally:
        for folder in SPEC_FOLDERS:
            shutil.rmtree(folder, ignore_errors=True)
    sys.exit(code)
