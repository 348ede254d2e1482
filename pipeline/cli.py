"""The ``winnow`` command line: a table of commands (``pipeline/commands``), each run as
``from_args`` -> ``run`` -> ``format_summary``."""
from __future__ import annotations

import argparse
import sys

from pipeline import commands
from pipeline.contract.errors import CheckpointError, ClusterError, ConfigError


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as pkg_version

    try:
        return pkg_version("winnow")
    except PackageNotFoundError:
        return "unknown (not installed; run from a checkout)"


# Loggers whose lines are about Ray's or the model libraries' own machinery, not the user's run: shown
# only with -v. (Token auth stays on; only its notice is hidden.)
CHATTY_LOGGERS = ("ray._private.authentication.authentication_token_setup", "ray._private.worker",
                  "ray.data._internal.execution.streaming_executor", "ray.data._internal.progress",
                  "ray.data.context", "ray.train.v2._internal.callbacks.accelerators", "ray.train",
                  "transformers", "diffusers", "huggingface_hub", "open_clip", "accelerate")


def quiet() -> None:
    """Quiet by default: hide the libraries' notices and progress bars (winnow prints its own), set
    before any of them is imported, so Ray's workers started from here inherit it too."""
    import logging
    import os

    for var, value in (("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TRANSFORMERS_VERBOSITY", "error"),
                       ("DIFFUSERS_VERBOSITY", "error"), ("TF_CPP_MIN_LOG_LEVEL", "2")):
        os.environ.setdefault(var, value)
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


class Parser(argparse.ArgumentParser):
    """argparse, with the nearest known option suggested for a mistyped one (``--inptu``)."""

    known: list[str] = []      # the selected command's option strings

    def error(self, message: str):
        import difflib

        if message.startswith("unrecognized arguments:"):
            hints = []
            for token in message.split(":", 1)[1].split():
                option = token.split("=", 1)[0]
                close = difflib.get_close_matches(option, self.known, n=1) if option.startswith("--") else []
                if close:
                    hints.append(f"{option}: did you mean {close[0]}?")
            if hints:
                message += "; " + "; ".join(hints)
        super().error(message)


def parser_for(selected: str | None) -> argparse.ArgumentParser:
    """Every command is listed; only the ``selected`` one is imported to add its arguments."""
    parser = Parser(prog="winnow", description="Curate image/video corpora for diffusion training, on Ray.")
    parser.add_argument("--version", action="version", version=f"winnow {version()}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show Ray's and the model libraries' own notices and progress bars")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_) in commands.COMMANDS.items():
        p = sub.add_parser(name, help=help_, formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == selected:
            cmd = commands.get(name)
            p.description = cmd.DESCRIPTION
            cmd.arguments(p)
            parser.known = [o for a in p._actions for o in a.option_strings if o.startswith("--")]
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    selected = next((a for a in argv if not a.startswith("-")), None)
    args = parser_for(selected if selected in commands.COMMANDS else None).parse_args(argv)
    if not args.verbose:
        quiet()
    cmd = commands.get(args.command)
    try:
        print(cmd.format_summary(cmd.run(cmd.from_args(args))))
        return 0
    except ConfigError as exc:        # a command that reads a spec says so; the others name their option
        print(f"winnow: {'bad spec: ' if hasattr(args, 'spec') else ''}{exc}", file=sys.stderr)
        return 2
    except ClusterError as exc:       # submit / jobs: the cluster refused or could not be reached
        print(f"winnow: {exc}", file=sys.stderr)
        return 1
    except CheckpointError as exc:    # a checkpoint winnow refuses to load
        print(f"winnow: bad checkpoint: {exc}", file=sys.stderr)
        return 1
    except KeyError as exc:       # an unknown stage name given to `winnow stages`
        if args.command != "stages":
            raise
        print(f"winnow: {exc.args[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
