"""The ``winnow`` command line: a table of commands (``pipeline/commands``), each run as
``from_args`` -> ``run`` -> ``format_summary``."""
from __future__ import annotations

import argparse
import sys

from pipeline import commands
from pipeline.contract.config import ConfigError


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as pkg_version

    try:
        return pkg_version("winnow")
    except PackageNotFoundError:
        return "unknown (not installed; run from a checkout)"


def parser_for(selected: str | None) -> argparse.ArgumentParser:
    """Every command is listed; only the ``selected`` one is imported to add its arguments."""
    parser = argparse.ArgumentParser(prog="winnow", description="Curate image/video corpora for diffusion training, on Ray.")
    parser.add_argument("--version", action="version", version=f"winnow {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_) in commands.COMMANDS.items():
        p = sub.add_parser(name, help=help_, formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == selected:
            cmd = commands.get(name)
            p.description = cmd.DESCRIPTION
            cmd.arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    selected = next((a for a in argv if not a.startswith("-")), None)
    args = parser_for(selected if selected in commands.COMMANDS else None).parse_args(argv)
    cmd = commands.get(args.command)
    try:
        print(cmd.format_summary(cmd.run(cmd.from_args(args))))
        return 0
    except ConfigError as exc:
        print(f"winnow: bad spec: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:   # a checkpoint winnow refuses to load (training.checkpoint.CheckpointError)
        if type(exc).__name__ == "ClusterError":      # submit / jobs: the cluster refused or could not be reached
            print(f"winnow: {exc}", file=sys.stderr)
            return 1
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
