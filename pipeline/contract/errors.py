"""The errors a command ends with, caught by type in ``pipeline/cli.py``: a spec (or an argument)
that cannot run, a checkpoint winnow refuses to load, a cluster that refused or could not be
reached. They live below ``config`` and ``storage`` so that both can raise them (config reads spec
files through storage, storage checks the places a spec names)."""
from __future__ import annotations


class ConfigError(ValueError):
    """A spec that cannot run. The message names the key and says how to fix it."""


class CheckpointError(RuntimeError):
    """A checkpoint file that is missing or not what winnow writes; the message names the file."""


class ClusterError(RuntimeError):
    """The cluster's job API refused a request or could not be reached."""


__all__ = ["CheckpointError", "ClusterError", "ConfigError"]
